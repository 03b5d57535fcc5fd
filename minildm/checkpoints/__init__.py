"""How official checkpoint files become minildm's modules (the porter's page is written below as
the package fills)."""
