"""Entry point: `python eval/mmbench.py --help`. The logic lives in llava_ft.eval.mmbench."""

from llava_ft.eval.mmbench import main

if __name__ == "__main__":
    raise SystemExit(main())
