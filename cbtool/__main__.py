"""``python -m cbtool`` (and ``torchrun -m cbtool``)."""

import sys

try:
    from cbtool.cli.app import main
except KeyboardInterrupt:  # Ctrl-C while Python is still importing: nothing has started
    sys.stderr.write("cbtool: interrupted; nothing was written\n")
    sys.exit(130)

if __name__ == "__main__":
    main()
