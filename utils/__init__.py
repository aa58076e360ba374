"""What two or more stages share. Installed as `sophiavl.utils` (pyproject.toml maps this folder there), not as a
top-level `utils`: a module of so common a name in a user's environment would clash with other distributions'.
Import it by that name (`from sophiavl.utils.trust import trust_rewards`); it imports no stage."""
