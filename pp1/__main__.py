from pp1.cli import entry

entry()
