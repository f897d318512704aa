"""`veil check`: failures say what is missing and how to fix it."""

from veil.agent import check


def test_missing_tool_names_the_package():
    c = check._tool("veil-no-such-tool", "some-package")()
    assert not c.ok and c.detail == "not found" and "apt-get install some-package" in c.fix


def test_report_marks_sections_and_fixes():
    report = {
        "lab": [check.Check("root", True, "running as root")],
        "eBPF capture": [check.Check("kernel BTF", False, "not found", "a BTF kernel")],
    }
    text = check.format_report(report)
    assert "lab: ready" in text and "eBPF capture: NOT ready" in text
    assert "[FAIL] kernel BTF: not found" in text and "fix: a BTF kernel" in text
