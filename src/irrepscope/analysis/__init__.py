"""Which spherical-harmonic orders a trained model uses, and what its latent space looks like.

``features`` runs the model over a split once and collects per-order invariants and
gradients; ``usage`` turns them into the usage table; ``latent`` draws 2-D maps of the
rotation-invariant graph embedding; ``complexity`` computes RDKit's normalised spatial
score; ``runner`` ties the stages together for ``irrepscope analyze``.
"""
