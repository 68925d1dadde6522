"""Check data files against a config before training, listing every bad record instead of stopping at the first.

    python tools/validate.py args/multimodal_cot.yaml [key=value ...]

For train_path and val_path: the file parses, each record follows the format, every image exists and decodes,
and (with max_length set) no record is longer. Exits 0 when all is well, 1 with one line per problem otherwise,
2 for a bad config.
"""

from __future__ import annotations

import sys

from config import config_parser, load_config
from dataset import Encoding, longest_sequence, tokenize_record
from images import image_file, image_paths, to_rgb
from models import encoding_for, load_base
from records import read_records, record_name, record_problem
from utils import UserError, entry_point


def find_problems(path: str, encoding: Encoding) -> tuple[int, list[str]]:
    """(number of records, one line per problem) for one data file."""
    config = encoding.config
    try:
        records = read_records(path)
    except UserError as err:
        return 0, [str(err)]
    problems = []
    for index, record in enumerate(records):
        where = record_name(path, index, record)
        problem = record_problem(record)
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        try:
            for image in image_paths(record, path, config.image_root):
                with image_file(image, where) as opened:
                    to_rgb(opened)  # decodes every pixel: truncated files fail here
            length = longest_sequence(tokenize_record(record, where, path, encoding), config)
        except UserError as err:
            problems.append(str(err))
            continue
        if config.max_length and length > config.max_length:
            problems.append(f"{where}: {length} tokens, more than max_length {config.max_length}")
    return len(records), problems


@entry_point
def main(argv: list[str] | None = None) -> None:
    """`python tools/validate.py CONFIG [key=value ...]`: one line per problem, exit status 1 when there is any."""
    args = config_parser("List every bad record of a config's data files.").parse_args(argv)
    config = load_config(args.config, args.overrides)
    base, tokenizer = load_base(config.model_id, config.latent_init)
    encoding = encoding_for(base, tokenizer, config)
    failed = False
    for path in dict.fromkeys(p for p in (config.train_path, config.val_path) if p):
        count, problems = find_problems(path, encoding)
        for line in problems:
            print(line)
        print(f"{path}: {count} records, {len(problems)} problems")
        failed |= bool(problems)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
