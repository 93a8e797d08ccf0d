"""The README's generated sections are what the code says."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_grammar_tables_are_the_grammar():
    printed = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "grammar_tables.py")],
                             capture_output=True, text=True, check=True).stdout
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    begin, end = printed.splitlines()[0], printed.splitlines()[-1]
    assert begin in readme and end in readme, "the README lost its grammar tables"
    shown = readme[readme.index(begin):readme.index(end) + len(end)]
    assert shown == printed.strip(), "README grammar tables are stale: rerun scripts/grammar_tables.py"
