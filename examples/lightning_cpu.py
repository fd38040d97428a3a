"""A Lightning module fitted with ``strategy="ddp"`` on 2 CPU processes, by nbdist.

    pip install lightning    # or: pip install 'nbdist[frameworks]'
    python examples/lightning_cpu.py

``train`` builds the ``Trainer`` as a torchrun script would. Lightning finds torchrun's
environment (``TorchElasticEnvironment``), so it spawns no processes of its own and
uses the process group nbdist already set up. The data is synthetic:
y = 3·x₀ − 2·x₁ + 1 plus a little noise. What to check in the output: world size 2, the
fitted weights near (3, −2) and 1, and both ranks holding identical weights.
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
    import lightning as L

    class Regression(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.linear(x), y)
            self.log("loss", loss, on_epoch=True, on_step=False, sync_dist=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    torch.manual_seed(0)
    model = Regression()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=epochs,
                        # keep the output short and write no files: no bar, no logs
                        enable_progress_bar=False, enable_model_summary=False,
                        logger=False, enable_checkpointing=False)
    # Lightning adds the DistributedSampler: each rank fits on its own half of the data
    trainer.fit(model, DataLoader(make_data(), batch_size=32, shuffle=True))
    return {"world_size": trainer.world_size,
            "loss": trainer.callback_metrics["loss"].item(),
            "state": model.linear.state_dict()}


if __name__ == "__main__":
    first, second = nbdist.run_distributed(train, nprocs=2, return_all=True)
    state = first["state"]
    same = all(torch.equal(state[k], second["state"][k]) for k in state)
    print(f"world size: {first['world_size']}, final loss {first['loss']:.4f}")
    print(f"weights: {[round(w, 2) for w in state['weight'].flatten().tolist()]}, "
          f"bias: {state['bias'].item():.2f}")
    print(f"weights identical on both ranks: {same}")
