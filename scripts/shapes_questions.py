"""Write a small POPE-style question set from the shape-scene generator (for demos and scripts/gpu_check.sh).

    python scripts/shapes_questions.py OUT_DIR [--n 40] [--seed 7] [--yes-no]

OUT_DIR/questions.jsonl (question_id, image, text, label, category = question type) and OUT_DIR/images/*.png;
the shipped shapes-llava answers these (`python -m transprune.eval --model shapes-llava --questions ...`).
--yes-no keeps only the "Is there a ...?" questions (POPE-like scoring).
"""

import argparse
import json
from pathlib import Path

from transprune.shapes import scenes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--n", type=int, default=40, help="questions to write")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--yes-no", action="store_true", help="only yes/no questions")
    args = parser.parse_args(argv)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    examples = scenes.dataset(args.seed, args.n * (len(scenes.QUESTION_TYPES) if args.yes_no else 1))
    if args.yes_no:
        examples = [e for e in examples if e.question.qtype == "exists"]
    with (out / "questions.jsonl").open("w") as file:
        for i, example in enumerate(examples[: args.n]):
            example.image.save(out / "images" / f"{i}.png")
            file.write(json.dumps(dict(question_id=i, image=f"{i}.png", text=example.question.text,
                                       label=example.question.answer, category=example.question.qtype)) + "\n")
    print(out / "questions.jsonl")


if __name__ == "__main__":
    main()
