"""The classic MNIST ConvNet, trained one epoch on fixed synthetic data with DDP.

Used twice by the equivalence test: through ``nbdist.run_distributed`` and as a plain
script under ``torchrun`` (``python -m torch.distributed.run ... convnet_train.py OUT``).
Both must produce the same weights.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(self.dropout1(x), 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


def synthetic_mnist(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=g),
                         torch.randint(0, 10, (n,), generator=g))


def train(epochs=1, batch_size=32):
    """One DDP training run; returns rank 0's state_dict (CPU)."""
    torch.manual_seed(0)  # same init on every rank, and the same dropout masks per rank
    model = DDP(Net())
    data = synthetic_mnist()
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    torch.manual_seed(1 + dist.get_rank())
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            F.nll_loss(model(x), y).backward()
            opt.step()
    return model.module.state_dict()


if __name__ == "__main__":
    dist.init_process_group("gloo")
    state = train()
    if dist.get_rank() == 0:
        torch.save(state, sys.argv[1])
    dist.destroy_process_group()
    # torch 2.13's interpreter teardown after a DDP run aborts now and then ("terminate
    # called without an active exception"); the result is saved, so skip it, as the
    # nbdist ranks do (_worker._exit_after_atexit)
    sys.stdout.flush()
    os._exit(0)
