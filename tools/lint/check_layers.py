"""Checks the module map of docs/architecture.md on the C++ sources:

  * no module includes one above it: each module's allowed includes are listed in ALLOWED;
  * generated protobuf headers (kraken/v1/*.pb.h, inference/*.pb.h) are included only in server/, cluster/ and proto/;
  * no function in core/, server/ or runtime/ runs past MAX_FUNCTION_LINES lines (top-level
    definitions, from the line that opens the body to the line that closes it).

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
    "proto": set(),
}
PROTOBUF_OK = {"server", "proto", "cluster"}
LENGTH_CHECKED = {"core", "server", "runtime", "http", "openai", "cluster"}
MAX_FUNCTION_LINES = 80

INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')
# A top-level function definition whose body opens at the end of a line starting in column 0.
DEFINITION = re.compile(r"^[A-Za-z_].*\)\s*(const)?\s*(noexcept)?\s*(override)?\s*\{\s*$")


def sources(root):
    out = subprocess.run(["git", "ls-files", "*.cc", "*.h", "*.cu"], cwd=root, capture_output=True, text=True,
                         check=True).stdout.split()
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


def check_lengths(path, lines, findings):
    if path.split("/", 1)[0] not in LENGTH_CHECKED:
        return
    start = None
    for n, line in enumerate(lines, 1):
        if start is None and DEFINITION.match(line) and not line.startswith(("namespace", "class", "struct", "enum")):
            start = n
        elif start is not None and line.startswith("}"):
            length = n - start + 1
            if length > MAX_FUNCTION_LINES:
                findings.append(f"{path}:{start}: function of {length} lines (at most {MAX_FUNCTION_LINES})")
            start = None


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.getcwd()
    findings = []
    for path in sources(root):
        with open(os.path.join(root, path), encoding="utf-8") as f:
            lines = f.read().splitlines()
        check_includes(path, lines, findings)
        check_lengths(path, lines, findings)
    for f in findings:
        print(f)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
