"""Answering one message: the per-message job, the per-bot Dify app, the text writer and the task set.

    DifyApp      one bot's Dify app: client, cached app mode and parameters, who a call is made as
    Answers      one bot's answer jobs: starts them (up to the process's cap) and takes sessions over
    AnswerJob    one message: wait for its turn, ask Dify, stream the answer into the store
    Flusher      the process's one writer: every live stream's pending text in one round trip per tick
    StreamWriter one stream's text on its way to the store (coalescing; finish and replace)
    AnswerTasks  the answers running on this process, their cap, and shutdown
"""
