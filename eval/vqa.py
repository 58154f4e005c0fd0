"""Entry point: `python eval/vqa.py --help`. The logic lives in llava_ft.eval.vqa."""

from llava_ft.eval.vqa import main

if __name__ == "__main__":
    raise SystemExit(main())
