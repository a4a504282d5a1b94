"""python -m difflab.noise_report [dataset=OPTION] [noise=OPTION]: the entry point of :mod:`difflab.tasks.noise_report`."""

from difflab.tasks.noise_report import main

if __name__ == "__main__":
    main()
