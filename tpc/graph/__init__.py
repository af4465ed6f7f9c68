"""Read-only analysis of exported aten graphs: attention sites, the residual stream,
prefix tokens, and the shape arithmetic that locates the token axis."""

from tpc.graph.attention import AttentionSite, find_attention_sites
from tpc.graph.stream import StreamPoint, find_stream_point
from tpc.graph.prefix import count_prefix_tokens

__all__ = ["AttentionSite", "StreamPoint", "count_prefix_tokens", "find_attention_sites", "find_stream_point"]
