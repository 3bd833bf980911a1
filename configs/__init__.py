"""Training configs: ``python train.py --config configs/<name>.py --workdir <dir>``.

Each module has ``get_config() -> ml_collections.ConfigDict``. ``digits`` is the default and lists
every key; the others import it and change what differs.
"""
