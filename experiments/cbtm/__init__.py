"""c-BTM (Gururangan et al. 2023, "Scaling Expert Language Models with Unsupervised
Domain Discovery"): cluster a corpus, train one branch LM per cluster, ensemble them
with weights from the context's distance to the cluster centres (docs/cbtm.md)."""
