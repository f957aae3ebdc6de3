"""FSDP2 for the torch backend: ``TorchTrainer``'s step on sharded ranks (``rank``), driven as
one ``TrainerBackend`` over Ray actors in a placement group (``group``)."""
