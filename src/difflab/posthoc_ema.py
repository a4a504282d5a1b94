"""python -m difflab.posthoc_ema run=DIR sigma_rel=S [out=FILE]: the entry point of :mod:`difflab.tasks.posthoc_ema`."""

from difflab.tasks.posthoc_ema import main

if __name__ == "__main__":
    main()
