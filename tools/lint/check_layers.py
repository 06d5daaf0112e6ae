"""Checks the module map of docs/architecture.md on the C++ sources:

  * every top-level folder with C++ sources is a module of ALLOWED or one of NOT_MODULES (a new
    module must be placed in the map before it can be checked);
  * no module includes one above it: each module's allowed includes are listed in ALLOWED;
  * generated protobuf headers (kraken/v1/*.pb.h, inference/*.pb.h) are included only in server/, cluster/ and proto/;
  * no function of any module runs past MAX_FUNCTION_LINES lines (top-level
    definitions, from the first line of the signature, however many lines it and a constructor's
    initializer list take, to the line that closes the body).

Prints one line per finding (file:line: what) and exits 1 if there is any.
Usage: python3 tools/lint/check_layers.py [repository root]
"""
import os
import re
import subprocess
import sys

# Module -> the modules whose headers it may include (itself always). Tests, benchmarks and tools
# may include anything.
ALLOWED = {
    "base": set(),
    "engine": {"base"},
    "tokenizer": {"base"},
    "metrics": {"base"},
    "scheduler": {"base"},
    "runtime": {"base", "engine"},
    "core": {"base", "engine", "tokenizer", "runtime", "scheduler", "metrics"},
    "http": {"base"},
    "openai": {"base", "engine", "tokenizer", "core", "http", "metrics"},
    "cluster": {"base", "engine", "runtime", "proto"},
    "server": {"base", "engine", "tokenizer", "runtime", "scheduler", "metrics", "core", "http", "openai", "proto",
               "cluster"},
    "proto": {"base"},
}
# Top-level folders that hold C++ but are not modules of the server: they may include anything.
NOT_MODULES = {"tests", "bench", "tools"}
PROTOBUF_OK = {"server", "proto", "cluster"}
MAX_FUNCTION_LINES = 80

# A template header or attributes before a definition: `template <typename T>`, `[[gnu::cold]]`.
DECORATION = re.compile(r"^(?:template\s*<[^;{]*?>\s*|\[\[[^\]]*\]\]\s*)+")
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')
# Lines in column 0 that do not begin a function definition.
NOT_A_FUNCTION = ("namespace", "class ", "struct ", "enum ", "union ", "extern ", "using ", "typedef ", "template",
                  "static_assert", "friend ", "#", "//", "}")


def sources(root, findings):
    out = subprocess.run(["git", "ls-files", "*.cc", "*.h", "*.cu"], cwd=root, capture_output=True, text=True,
                         check=True).stdout.split()
    unknown = sorted({p.split("/", 1)[0] for p in out if "/" in p} - set(ALLOWED) - NOT_MODULES)
    for top in unknown:
        findings.append(f"{top}/: C++ sources in a folder that is not in the module map (tools/lint/check_layers.py "
                        "ALLOWED, and docs/architecture.md)")
    return [p for p in out if p.split("/", 1)[0] in ALLOWED]


def check_includes(path, lines, findings):
    module = path.split("/", 1)[0]
    for n, line in enumerate(lines, 1):
        m = INCLUDE.match(line)
        if not m:
            continue
        target = m.group(1)
        if target.endswith(".pb.h") and module not in PROTOBUF_OK:
            findings.append(f"{path}:{n}: includes the generated protobuf header {target} outside server/ and proto/")
            continue
        top = "proto" if target.startswith(("kraken/v1/", "kraken/cluster/", "inference/")) else target.split("/", 1)[0]
        if top in ALLOWED and top != module and top not in ALLOWED[module]:
            findings.append(f"{path}:{n}: {module}/ may not include {target} ({top}/ is not below it)")


def function_spans(lines):
    """(first line, last line) of each top-level function definition, 1-based: from the line in
    column 0 that begins its signature (its template header or attributes included, on that line
    or the lines just before) to the '}' in column 0 that closes its body."""
    spans, start, in_body, decorated = [], None, False, None
    for n, line in enumerate(lines, 1):
        if not in_body:
            head = DECORATION.sub("", line) if start is None else line
            if start is None and head != line and not head.strip():
                decorated = decorated or n  # a template header or attributes alone on their line
                continue
            if start is None and head[:1] and (head[0].isalpha() or head[0] in "_~") and not head.startswith(NOT_A_FUNCTION):
                start = decorated or n
            decorated = None
            if start is not None:
                code = line.split("//", 1)[0].rstrip()
                if code.endswith("{}") or (code.endswith(";") and not code.endswith("};")):
                    start = None  # a declaration, or an empty body
                elif code.endswith("{"):
                    in_body = True
        elif line.startswith("}"):
            spans.append((start, n))
            start, in_body = None, False
    return spans


def check_lengths(path, lines, findings):
    if path.split("/", 1)[0] not in ALLOWED:
        return
    for start, end in function_spans(lines):
        length = end - start + 1
        if length > MAX_FUNCTION_LINES:
            findings.append(f"{path}:{start}: function of {length} lines (at most {MAX_FUNCTION_LINES})")


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.getcwd()
    findings = []
    for path in sources(root, findings):
        with open(os.path.join(root, path), encoding="utf-8") as f:
            lines = f.read().splitlines()
        check_includes(path, lines, findings)
        check_lengths(path, lines, findings)
    for f in findings:
        print(f)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
