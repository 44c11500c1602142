"""What the robot keeps of what it saw: each frame–caption episode with its pose in a crash-safe
store (SQLite, or PostgreSQL for a fleet), searched by words and embeddings, and
`EpisodicMemoryService`, which keeps that store and the model's memory matrix in agreement."""
