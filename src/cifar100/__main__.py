import sys

from cifar100.cli import main

sys.exit(main())
