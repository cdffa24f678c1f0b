"""Train the demo's second teacher: the same task under another tokenizer, for the cross-tokenizer demonstration
(docs/cross_tokenizer.md).

Reproduces ``src/reopold/assets/demo/teacher-merges`` (deterministic given --seed and the thread count):

    python scripts/train_merged_teacher.py --out src/reopold/assets/demo/teacher-merges

The tokenizer is the demo's char-level one plus merged tokens, cut greedily from the left: ``--merges
digit-operators`` (the default, the shipped one) adds a token for each digit followed by an operator ("7*", "6=",
"2;", 50 tokens), so "347*6=2082;" is "3" "4" "7*" "6=" "2" "0" "8" "2;"; ``--merges digit-pairs`` adds the 100
pairs "00".."99" ("2082" -> "20" "82"). The model starts from the demo teacher's weights: its rows keep their ids,
and each new row (tied input embedding and output row) starts as the mean of its characters' rows; then gold SFT
under the new tokenizer teaches it the merged tokens. Measured (log in docs/cross_tokenizer.md): digit pairs are
slow to learn this way (a pair token is two digits of a product at once: 15% greedy accuracy after 750 steps),
digit-operator merges are not (the operator after a digit is the decision the char teacher already makes there).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_teacher import finish, model_parser, save_checkpoint, train_gold_sft  # noqa: E402

from reopold.models.loading import load_model  # noqa: E402
from reopold.tasks import ArithmeticTask, build_tokenizer  # noqa: E402
from reopold.tasks.tokenizer import MERGES  # noqa: E402


def widen(model, old_tokenizer, new_tokenizer) -> None:
    """Give ``model`` the rows of ``new_tokenizer``: old tokens keep theirs, a pair starts as its digits' mean."""
    old_vocab, new_vocab = old_tokenizer.get_vocab(), new_tokenizer.get_vocab()
    assert all(new_vocab[token] == i for token, i in old_vocab.items()), "the new tokenizer must extend the old one"
    model.resize_token_embeddings(len(new_tokenizer), mean_resizing=False)  # every new row is set below
    weight = model.get_input_embeddings().weight  # tied with the output layer
    with torch.no_grad():
        for token, i in new_vocab.items():
            if token not in old_vocab:
                weight[i] = weight[[old_vocab[c] for c in token]].mean(0)
    model.config.vocab_size = len(new_tokenizer)


def main() -> None:
    ap = model_parser(__doc__, out="src/reopold/assets/demo/teacher-merges", hidden=128, layers=4, steps=600,
                      lr=1e-3, warmup=50, final_frac=0.1, eval_every=200)
    ap.set_defaults(init="demo-teacher")  # model_parser's --init: here the char-level teacher to start from
    ap.add_argument("--merges", choices=sorted(MERGES), default="digit-operators", help="the merged tokens")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    task = ArithmeticTask(digits=tuple(args.digits))
    tokenizer = build_tokenizer(task.alphabet, merges=MERGES[args.merges])
    model = load_model(args.init).to(args.device)
    widen(model, build_tokenizer(task.alphabet), tokenizer)
    print(f"{task!r}: {args.merges}, vocab {len(tokenizer)}, from {args.init}", flush=True)
    t0 = time.time()
    train_gold_sft(model, tokenizer, task, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                   warmup=args.warmup, final_frac=args.final_frac, seed=args.seed, bf16=False,
                   eval_every=args.eval_every, eval_problems=task.problems("validation", args.eval_n),
                   log=lambda s: print(s, flush=True),
                   on_eval=lambda: save_checkpoint(model, tokenizer, args.out, task))
    finish(model, tokenizer, task, args, started=t0)


if __name__ == "__main__":
    main()
