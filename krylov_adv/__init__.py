"""krylov_adv: second-order (Krylov-Newton) adversarial attacks and adversarial training in JAX.

Core numerics: :mod:`krylov_adv.hvp` (input Hessian-vector products) and
:mod:`krylov_adv.krylov` (batched GMRES). Attacks live in :mod:`krylov_adv.attacks`.
"""

__version__ = "0.1.0"
