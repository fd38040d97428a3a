"""An ordinary HF accelerate training loop, run on 2 CPU processes by nbdist.

    pip install accelerate    # or: pip install 'nbdist[frameworks]'
    python examples/accelerate_cpu.py

``train`` is what an accelerate tutorial writes: ``Accelerator()`` with no ``cpu=True``,
then ``prepare`` and ``accelerator.backward``. nbdist starts the ranks under torchrun;
in a CPU job accelerate sees two processes (``MULTI_CPU``) and syncs the gradients.
The data is synthetic: y = 3·x₀ − 2·x₁ + 1 plus a little noise. What to check in the
output: 2 processes, the loss falls, the fitted weights are near (3, −2) and 1, and
both ranks hold identical weights.
"""

import torch
from torch.utils.data import DataLoader, TensorDataset

import nbdist


def make_data(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = x @ torch.tensor([3.0, -2.0]) + 1.0 + 0.05 * torch.randn(n, generator=g)
    return TensorDataset(x, y.unsqueeze(1))


def train(epochs=10, lr=0.1):
    from accelerate import Accelerator

    accelerator = Accelerator()
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(make_data(), batch_size=32, shuffle=True)
    # prepare wraps the model in DDP and gives each rank its own shard of the data
    model, opt, loader = accelerator.prepare(model, opt, loader)
    for epoch in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            opt.step()
        if epoch % 5 == 0 or epoch == epochs - 1:
            accelerator.print(f"epoch {epoch}: loss {loss.item():.4f}")
    return {"processes": accelerator.num_processes,
            "type": str(accelerator.distributed_type),
            "state": accelerator.unwrap_model(model).state_dict()}


if __name__ == "__main__":
    first, second = nbdist.run_distributed(train, nprocs=2, return_all=True)
    state = first["state"]
    same = all(torch.equal(state[k], second["state"][k]) for k in state)
    print(f"processes: {first['processes']} ({first['type']})")
    print(f"weights: {[round(w, 2) for w in state['weight'].flatten().tolist()]}, "
          f"bias: {state['bias'].item():.2f}")
    print(f"weights identical on both ranks: {same}")
