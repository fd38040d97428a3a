"""Train the classic MNIST ConvNet with DDP on 2 CPU processes, from plain Python.

    python examples/ddp_convnet.py

The data is synthetic (no download): each of the 10 classes is a bright 7x7 patch at
its own place in a noisy 28x28 image, so the loss visibly falls within two epochs.
What to check in the output: the loss falls, accuracy ends near 100 %, and both ranks
hold identical weights (DDP keeps the replicas in sync).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import nbdist


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


def synthetic_digits(n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randn(n, 1, 28, 28, generator=g)
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 4)
        images[i, 0, 2 + 9 * row: 9 + 9 * row, 1 + 7 * col: 8 + 7 * col] += 1.0
    return TensorDataset(images, labels)


def train(epochs=3, batch_size=64, lr=0.05):
    """Runs on every rank; returns this rank's weights and rank 0's loss history."""
    torch.manual_seed(0)
    model = DDP(Net())
    data = synthetic_digits()
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for epoch in nbdist.track(range(epochs), desc="epoch"):
        sampler.set_epoch(epoch)  # a different shuffle each epoch, the same on all ranks
        for x, y in nbdist.track(loader, desc="batch"):
            opt.zero_grad()
            loss = F.nll_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            nbdist.report(loss=loss.item())
        if nbdist.is_main():
            print(f"epoch {epoch}: loss {losses[-1]:.3f} "
                  f"(global batch {batch_size * nbdist.world_size()})")
    return {"state": model.module.state_dict(), "losses": losses}


def accuracy(state, data):
    model = Net()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        images, labels = data.tensors
        return (model(images).argmax(1) == labels).float().mean().item()


if __name__ == "__main__":
    ranks = nbdist.run_distributed(train, nprocs=2, return_all=True)
    first, second = ranks
    same = all(torch.equal(first["state"][k], second["state"][k]) for k in first["state"])
    print(f"loss: first batch {first['losses'][0]:.3f} -> last batch {first['losses'][-1]:.3f}")
    print(f"accuracy on held-out synthetic data: "
          f"{accuracy(first['state'], synthetic_digits(512, seed=1)):.1%}")
    print(f"weights identical on both ranks: {same}")
