"""The ranking UI (Gradio): talks to serving over the wire only."""
