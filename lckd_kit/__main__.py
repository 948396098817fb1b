"""``python -m lckd_kit ...`` is the same as the ``lckd-kit`` console script."""
from lckd_kit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
