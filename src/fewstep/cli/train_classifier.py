"""``fewstep train-classifier``: the small CNN that judges samples and embeds them for FID/KID."""

from __future__ import annotations

import argparse

from .args import command_line, number, positive_int, seed


def add_parser(sub) -> None:
    p = sub.add_parser("train-classifier", help="train the small classifier used for accuracy and FID features",
                       description="Train the CNN that judges samples (conditional accuracy) and embeds them "
                                   "(FID/KID features); reports held-out accuracy.")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=positive_int, default=None)
    p.add_argument("--channels", type=int, choices=[1, 3], default=1)
    p.add_argument("--epochs", type=positive_int, default=60)
    p.add_argument("--instance", action="store_true",
                   help="train the data set's feature network instead: every image its own class (instance "
                        "discrimination), whose features are the ruler's FID/KID/precision/recall features; ship it "
                        "as models/<dataset>-features")
    p.add_argument("--width", type=positive_int, default=32, help="channels of the first stage (features: 4× this)")
    p.add_argument("--batch", type=positive_int, default=128)
    p.add_argument("--lr", type=number(0.0, 1.0, lo_open=True), default=2e-3)
    p.add_argument("--holdout", type=number(0.0, 1.0, lo_open=True, hi_open=True), default=0.2, help="fraction held out for the accuracy figure")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true",
                   help="write --out even if it is an existing folder that fewstep did not write: fewstep's files "
                        "are put in (replacing those of the same names), everything else there stays")
    p.set_defaults(func=run, folder_outputs=("out",))      # checked before any work (fewstep.cli.check_outputs)


def run(args: argparse.Namespace) -> None:
    from ..io.atomic import check_replaceable
    from ..models.data import load_dataset
    from ..nets.classifier import save_classifier, train_classifier

    check_replaceable(args.out)
    data = load_dataset(args.dataset, args.image_size, args.channels)
    train_set, heldout = (data, None) if args.instance else data.split(args.holdout, seed=args.seed)
    model = train_classifier(train_set, heldout, epochs=args.epochs, batch_size=args.batch, lr=args.lr,
                             width=args.width, seed=args.seed, progress=not args.no_progress, instance=args.instance)
    save_classifier(model, args.out, command_line(args))
    if args.instance:
        print(f"saved feature network to {args.out}: names the image behind a fresh view of each of {len(data)} "
              f"images with accuracy {model.config.heldout_accuracy:.4f}")
    else:
        print(f"saved classifier to {args.out}: held-out accuracy {model.config.heldout_accuracy:.4f} "
              f"on {len(heldout)} images")
