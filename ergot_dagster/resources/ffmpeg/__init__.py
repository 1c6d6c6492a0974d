"""The FFmpeg runtime: ffmpeg/ffprobe on this node, and the recipes it runs."""
