"""Attacks: PGD (L∞, L2) with restarts and the pieces it is made of."""

from .pgd import PGD, attack_loss, margin_loss, pgd_step, random_start

__all__ = ["PGD", "attack_loss", "margin_loss", "pgd_step", "random_start"]
