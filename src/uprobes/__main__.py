import sys

from uprobes.commands import entry_point

sys.exit(entry_point())
