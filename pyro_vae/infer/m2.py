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
``differentiable_loss`` compute :math:`-\mathcal{J}^\alpha` as they are. The training loop
reaches it through M2's capabilities (``enumerate``: :func:`~pyro_vae.infer.objectives.training_elbo`)
and its ``step_arguments`` (the labelled minibatch of every step); the fused path does not apply.
"""

from __future__ import annotations

from pyro.infer import TraceEnum_ELBO

__all__ = ["m2_elbo"]


def m2_elbo() -> TraceEnum_ELBO:
    """The estimator: one ``z`` per image and label value, ``y`` summed out exactly."""
    return TraceEnum_ELBO(max_plate_nesting=1)

