"""The layer check (tools/lint/check_layers.py) on small repositories made for it: each rule finds
what it exists for, including the shapes that once slipped past it (a folder outside the module
map, a function whose signature or initializer list spans many lines)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECK = os.path.join(ROOT, "tools", "lint", "check_layers.py")


def check(tmp_path, files):
    for path, text in files.items():
        os.makedirs(os.path.dirname(tmp_path / path), exist_ok=True)
        (tmp_path / path).write_text(text)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "add", "."], check=True)
    r = subprocess.run([sys.executable, CHECK, str(tmp_path)], capture_output=True, text=True)
    return r.returncode, r.stdout.splitlines()


def body(n):
    return "".join(f"  x += {i};\n" for i in range(n))


def test_a_clean_tree_passes(tmp_path):
    rc, out = check(tmp_path, {"core/a.cc": '#include "base/status.h"\nint F(int x) {\n' + body(70) + "  return x;\n}\n",
                               "tests/t.cc": '#include "server/main.h"\n'})
    assert (rc, out) == (0, [])


def test_an_upward_include_is_found(tmp_path):
    rc, out = check(tmp_path, {"engine/a.cc": '#include "server/flags.h"\n'})
    assert rc == 1 and out == ["engine/a.cc:1: engine/ may not include server/flags.h (server/ is not below it)"]


def test_a_folder_outside_the_module_map_is_found(tmp_path):
    rc, out = check(tmp_path, {"gateway/a.cc": '#include "server/flags.h"\n', "core/b.cc": "int x;\n"})
    assert rc == 1 and len(out) == 1 and out[0].startswith("gateway/: C++ sources in a folder that is not in the module map")


def test_a_long_function_is_measured_from_its_signature_whatever_its_shape(tmp_path):
    one_line = "int F(int x) {\n" + body(80) + "  return x;\n}\n"                       # 83 lines
    signature = "int G(int a,\n      int b,\n      int c) {\n  int x = 0;\n" + body(76) + "  return x;\n}\n"  # 82
    initializers = ("Thing::Thing(int a)\n    : a_(a),\n" + "".join(f"      m{i}_({i}),\n" for i in range(76)) +
                    "      z_(0) {\n  Init();\n}\n")                                    # 81 lines
    short = "int H(int a,\n      int b) {\n" + body(60) + "  return a;\n}\n"
    rc, out = check(tmp_path, {"runtime/a.cc": "namespace k {\n\n" + one_line + "\n" + signature + "\n" + initializers +
                               "\n" + short + "\n}  // namespace k\n"})
    assert rc == 1
    assert out == ["runtime/a.cc:3: function of 83 lines (at most 80)",
                   "runtime/a.cc:87: function of 82 lines (at most 80)",
                   "runtime/a.cc:170: function of 81 lines (at most 80)"], out


def test_a_template_or_attributed_function_is_measured_from_its_header(tmp_path):
    one_line = "template <int N> int F(int x) {\n" + body(80) + "  return x;\n}\n"                      # 83 lines
    header = "template <typename T>\n[[gnu::always_inline]] inline T G(T x) {\n" + body(79) + "  return x;\n}\n"  # 83
    attributed = "[[nodiscard]] int H(int x) {\n" + body(79) + "  return x;\n}\n"                          # 82
    a_class = "template <typename T>\nstruct S {\n" + body(90) + "};\n"
    rc, out = check(tmp_path, {"engine/a.cc": one_line + "\n" + header + "\n" + attributed + "\n" + a_class})
    assert rc == 1
    assert out == ["engine/a.cc:1: function of 83 lines (at most 80)",
                   "engine/a.cc:85: function of 83 lines (at most 80)",
                   "engine/a.cc:169: function of 82 lines (at most 80)"], out


def test_every_module_is_measured_the_kernels_included_but_not_tests_or_tools(tmp_path):
    long = "int F(int x) {\n" + body(80) + "  return x;\n}\n"  # 83 lines
    rc, out = check(tmp_path, {f"{m}/a.cc": long for m in ("engine", "tokenizer", "scheduler", "tests", "tools")})
    assert rc == 1
    assert sorted(out) == [f"{m}/a.cc:1: function of 83 lines (at most 80)" for m in ("engine", "scheduler", "tokenizer")]


def test_the_repository_passes():
    r = subprocess.run([sys.executable, CHECK, ROOT], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
