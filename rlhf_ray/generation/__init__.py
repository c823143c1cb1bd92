"""Generation: the backend interface, the HF `generate` backend and the Generator actor class."""
