"""A file's DWARF, read only where a probe needs it: the compilation unit
at an address (index.py), the scopes and variables there, their types
(types.py), and where each variable is at that address (location.py)."""
