"""One module per benchmark group; each has NAME, TITLE and ``run(ctx) -> GroupResult``."""
