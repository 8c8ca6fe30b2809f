import sys

from malloc_ray.cli import main

sys.exit(main())
