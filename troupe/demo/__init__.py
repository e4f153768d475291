"""Built-in demo code: what ``make demo`` runs, and handlers anyone can serve to try troupe."""

__all__: list[str] = []
