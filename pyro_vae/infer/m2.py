r"""The objective of the semi-supervised M2 (:mod:`pyro_vae.program.m2`): Pyro's
``TraceEnum_ELBO`` on ``M2.model``/``M2.guide``, which sums the unlabelled images' label out.

With the guide's ``y`` marked ``infer={"enumerate": "parallel"}``, ``TraceEnum_ELBO`` runs the
guide once with ``y`` a tensor of all :math:`K` values on the dimension left of the data plate
(``[K, 1]``; ``max_plate_nesting=1``), so every site downstream has batch shape ``[K, B]``, and
contracts the costs with :math:`q(y \mid x)` exactly:

.. math::

    -\widehat{\mathcal{J}^\alpha} = -\frac{N}{B} \sum_{i \in \text{batch} \setminus \mathcal{D}_l}
    \sum_{y} q(y \mid x_i)\big[\mathcal{L}(x_i, y) - \log q(y \mid x_i)\big]
    - \frac{N_l}{L} \sum_{i \in \text{labelled batch}} \Big[\mathcal{L}(x_i, y_i)
    + \frac{\alpha}{N_l} \log q(y_i \mid x_i)\Big].

No subclass is needed: the classification term is an observed site of the model
(``y_q ~ q(y|x)``, scaled by :math:`\alpha / N_l`), so the parent's ``loss`` and
``differentiable_loss`` compute :math:`-\mathcal{J}^\alpha` as they are. The fused path does
not apply (``config.fused`` is ignored for M2).
"""

from __future__ import annotations

from pyro.infer import TraceEnum_ELBO

from ..core.config import VAEConfig

__all__ = ["m2_elbo", "m2_loss"]


def m2_elbo() -> TraceEnum_ELBO:
    """The estimator: one ``z`` per image and label value, ``y`` summed out exactly."""
    return TraceEnum_ELBO(max_plate_nesting=1)


def m2_loss(m2, config: VAEConfig):
    """``loss(x, idx, num_data, beta)`` for the trainer: a differentiable estimate of
    :math:`-\\mathcal{J}^\\alpha` on the minibatch ``x`` plus ``config.labelled_batch`` labelled
    images (:meth:`~pyro_vae.program.m2.M2.labelled_batch`, drawn from torch's seeded stream,
    which checkpoints save, so resuming draws the same)."""
    elbo = m2_elbo()
    binarize = config.binarize == "dynamic"

    def loss(x, idx, num_data, beta):
        labelled = m2.labelled_batch(config.labelled_batch, binarize)
        return elbo.differentiable_loss(m2.model, m2.guide, x, idx, num_data=num_data, beta=beta, labelled=labelled)

    loss.fused = False
    return loss
