"""The method: the ViT encoder, MAE, PEMAE with its heads, teachers and losses, and the collapse monitors."""
