"""laibao: a WeCom AI bot (企业微信智能机器人) in front of a Dify app, streaming answers."""

__version__ = "0.1.0"
