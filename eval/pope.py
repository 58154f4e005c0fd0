"""Entry point: `python eval/pope.py --help`. The logic lives in llava_ft.eval.pope."""

from llava_ft.eval.pope import main

if __name__ == "__main__":
    raise SystemExit(main())
