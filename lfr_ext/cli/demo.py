"""``python -m lfr_ext.demo``: LFR on real images, end to end, in about a minute on a CPU.

Trains the authors' SmallCNN on a slice of Fashion-MNIST for a few steps with the LFR loss,
then reports the penalty, the local-flatness metric and the time of one penalty call against
one PGD attack with as many steps (the cost the fast paths attack).
"""

from __future__ import annotations

import argparse
import time

import torch

from lfr_ext._version import __version__
from lfr_ext.data import load_fashion_mnist
from lfr_ext.models import SmallCNN
from lfr_ext.penalty import flatness_penalty, lfr_loss, local_flatness
from lfr_ext.training.methods import pgd_linf_ce


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=10, help="ascent steps")
    parser.add_argument("--lam", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    step_size = 2.5 * args.eps / args.steps
    x_all, y_all = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    print(
        f"lfr_ext {__version__}: SmallCNN on Fashion-MNIST ({len(x_all)} train images found), "
        f"eps={args.eps}, {args.steps} ascent steps of {step_size:.3f}, lam={args.lam}"
    )
    started = time.perf_counter()
    for step in range(args.train_steps):
        idx = torch.randint(0, len(x_all), (args.batch,))
        out = lfr_loss(model, x_all[idx], y_all[idx], lam=args.lam, eps=args.eps, step_size=step_size, steps=args.steps)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == args.train_steps - 1:
            acc = (out.logits.argmax(1) == y_all[idx]).float().mean()
            print(
                f"step {step:3d}  loss {out.loss.item():.4f}  CE {out.natural_loss.item():.4f}  "
                f"penalty {out.penalty.item():.4f}  batch acc {acc:.2f}"
            )
    print(f"trained {args.train_steps} LFR steps in {time.perf_counter() - started:.1f} s")

    model.eval()
    x, y = x_test[:128], y_test[:128]
    with torch.no_grad():
        clean_acc = (model(x).argmax(1) == y).float().mean().item()
    kw = dict(eps=args.eps, step_size=step_size, steps=args.steps)
    lf = local_flatness(model, x, y, **kw)
    t0 = time.perf_counter()
    penalty = flatness_penalty(model, x, y, **kw)
    t_penalty = time.perf_counter() - t0
    t0 = time.perf_counter()
    x_adv = pgd_linf_ce(model, x, y, **kw)
    t_pgd = time.perf_counter() - t0
    with torch.no_grad():
        robust_acc = (model(x_adv).argmax(1) == y).float().mean().item()
    print(
        f"test batch of 128: clean acc {clean_acc:.3f}, PGD-{args.steps} acc {robust_acc:.3f}, "
        f"penalty {penalty.item():.4f}, mean local flatness {lf.mean().item():.4f}"
    )
    print(
        f"one flatness_penalty call {t_penalty * 1e3:.0f} ms vs one PGD-{args.steps} attack {t_pgd * 1e3:.0f} ms "
        f"({t_penalty / t_pgd:.1f}x) on {'CPU' if x.device.type == 'cpu' else x.device}"
    )


if __name__ == "__main__":
    main()
