import pyro
import pytest
import torch

from pyro_vae import VAEConfig, load_dataset


@pytest.fixture(autouse=True)
def fresh_pyro():
    """Every test starts from an empty param store, a fixed seed and argument validation on."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def small_train():
    """600 embedded MNIST training images (grey values, dynamic binarization)."""
    return load_dataset("mnist-5k", "train", limit=600)


@pytest.fixture
def tiny_config():
    return VAEConfig(z_dim=4, hidden=(32,), epochs=1, batch_size=50, limit=200, val_size=100, validate=True)


@pytest.fixture
def binary_batch(small_train):
    return torch.bernoulli(small_train.images[:32], generator=torch.Generator().manual_seed(1))
