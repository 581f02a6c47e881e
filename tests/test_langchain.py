"""`memoryd_sdk.langchain.MemorydChat` against a real daemon (issue 11): LangChain runs (invoke, a
prompt | model | parser chain, streaming), sync and async, where each call sends only the messages the
session does not hold yet.  The tiny model's byte tokenizer makes the arithmetic exact: the session's
offset grows by the new turns' text, the kept reply and the turn's closing, nothing else."""

from __future__ import annotations

import functools
import operator
import sys
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from memoryd_sdk import MemoryClient, NotFound
from memoryd_sdk.langchain import MemorydChat, MemorydRetriever

pytest.register_assert_rewrite("sdk_fixtures")
from default_fixtures import DefaultDaemon  # noqa: E402
from sdk_fixtures import TOKENS  # noqa: E402
from service_fixtures import Daemon  # noqa: E402

pytest_plugins = ["sdk_fixtures", "default_fixtures"]
BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # the recall benchmark's facts (bench/recall.py)
CLOSE = "<|end|>\n"


def turns(*messages: tuple[str, str]) -> int:
    """Tokens (bytes) of some turns in the plain template, with the reply's opening."""
    return len("".join(f"<|{r}|>\n{c}<|end|>\n" for r, c in messages) + "<|assistant|>\n")


def kept(msg: AIMessage) -> int:
    out = msg.usage_metadata["output_tokens"]
    return out - (msg.response_metadata.get("finish_reason") == "stop_token")


@pytest.fixture
def observer(sdk_daemon: Daemon):
    with MemoryClient(sdk_daemon.address, token=TOKENS["alice"]) as c:
        yield c


def test_sync_conversation_sends_only_new_messages(sdk_daemon: Daemon, observer: MemoryClient) -> None:
    llm = MemorydChat(target=sdk_daemon.address, token=TOKENS["alice"], session_id="lc-sync", max_tokens=5)
    history = [SystemMessage("You keep notes."), HumanMessage("The key is under the mat.")]
    a1 = llm.invoke(history)
    assert isinstance(a1, AIMessage) and a1.response_metadata["session_id"] == "lc-sync"
    o1 = observer.get_session("lc-sync").offset
    assert o1 == turns(("system", "You keep notes."), ("user", "The key is under the mat.")) + kept(a1) + len(CLOSE)
    assert a1.usage_metadata["input_tokens"] + kept(a1) == o1

    history += [a1, HumanMessage("Where is the key?")]  # LangChain resends everything; only the last turn is new
    a2 = llm.invoke(history)
    o2 = observer.get_session("lc-sync").offset
    assert o2 - o1 == turns(("user", "Where is the key?")) + kept(a2) + len(CLOSE)
    with observer.session("lc-sync").fork(temporary=True) as twin:  # greedy from the session's state
        assert twin.reply([("user", "And the spare?")], max_tokens=5).text == (
            reply := "".join(c.text for c in llm.stream([*history, a2, HumanMessage("And the spare?")]))
        )
    assert llm.held[-1] == ("assistant", reply)

    with pytest.raises(ValueError, match="do not continue session"):  # edited history is refused, not resent
        llm.invoke([SystemMessage("Something else."), HumanMessage("hi")])
    offset = observer.get_session("lc-sync").offset
    chain = ChatPromptTemplate.from_messages([("human", "{question}")]) | llm | StrOutputParser()
    with pytest.raises(ValueError, match="do not continue"):  # a chain that sends one message: a new object
        chain.invoke({"question": "x"})
    assert observer.get_session("lc-sync").offset == offset
    llm.close()


def test_chain_on_a_fresh_session(sdk_daemon: Daemon, observer: MemoryClient) -> None:
    llm = MemorydChat(target=sdk_daemon.address, token=TOKENS["alice"], max_tokens=4)
    chain = (
        ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{question}")]) | llm | StrOutputParser()
    )
    text = chain.invoke({"question": "What is memoryd?"})
    assert isinstance(text, str) and llm.session_id is not None  # the model made its session
    assert observer.get_session(llm.session_id).offset > turns(("system", "Be brief."), ("user", "What is memoryd?"))
    llm.close()


@pytest.mark.asyncio
async def test_async_conversation(sdk_daemon: Daemon, observer: MemoryClient) -> None:
    llm = MemorydChat(target=sdk_daemon.address, token=TOKENS["alice"], session_id="lc-async", max_tokens=5)
    history = [HumanMessage("Remember 42.")]
    a1 = await llm.ainvoke(history)
    o1 = observer.get_session("lc-async").offset
    assert o1 == turns(("user", "Remember 42.")) + kept(a1) + len(CLOSE)
    history += [a1, HumanMessage("What number?")]
    chunks = [c async for c in llm.astream(history)]
    merged = functools.reduce(operator.add, chunks)  # LangChain's way to read a stream whole
    o2 = observer.get_session("lc-async").offset
    assert merged.response_metadata["offset"] == o2
    assert merged.usage_metadata["input_tokens"] == turns(("user", "What number?")) + len(CLOSE)
    assert o2 - o1 == turns(("user", "What number?")) + kept(merged) + len(CLOSE)
    assert llm.held == [
        ("user", "Remember 42."),
        ("assistant", a1.text),
        ("user", "What number?"),
        ("assistant", merged.text),
    ]


def test_readme_quick_start(sdk_daemon: Daemon, observer: MemoryClient, capsys: pytest.CaptureFixture) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = next(b.split("```", 1)[0] for b in readme.split("```python\n")[1:] if "MemorydChat" in b.split("```", 1)[0])
    assert len([line for line in code.splitlines() if line.strip()]) == 2
    code = code.replace('target="127.0.0.1:50051"', f"target={sdk_daemon.address!r}, token={TOKENS['alice']!r}")
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out and observer.get_session("agent-8").offset > 0


# -- MemorydRetriever (issue 21) ---------------------------------------------------------------------------


def noise(i: int) -> str:
    """An agent's turn without a fact."""
    return f"poll {i}: the scheduler checked the queue, moved {i % 5} jobs to the workers and wrote its log."


@pytest.mark.slow
def test_retriever_returns_the_answer_span_first(default_daemon: DefaultDaemon) -> None:
    """The recall benchmark's facts (bench/recall.py: five kinds, questions worded differently from the facts),
    each stated once, as a turn, among other turns of an agent's session on the default model (whose chat
    template gives the log its turns, so spans are turns): `invoke(question)` gives the fact's turn first, as
    a Document holding the answer whose metadata carry the turn's offsets and the score."""
    import recall as bench  # bench/recall.py

    facts = bench.facts_for([0], 10, seed=7)
    with MemoryClient(default_daemon.address, timeout=600) as client:
        s = client.create_session("lc-retriever")
        for i, fact in enumerate(facts):
            s.add_message("tool", noise(i))
            res = s.add_message(fact.role, fact.statement)
            fact.start, fact.end = res.start_offset, res.offset
        s.add_message("tool", noise(99))
    retriever = MemorydRetriever(target=default_daemon.address, session_id="lc-retriever", k=4)
    for fact in facts:
        docs = retriever.invoke(fact.question)
        top = docs[0]
        assert bench.answered(top.page_content, fact), (fact.question, top.page_content)
        m = top.metadata
        assert m["session_id"] == "lc-retriever" and m["start_offset"] < fact.end and fact.start < m["end_offset"], m
        assert [d.metadata["score"] for d in docs] == sorted((d.metadata["score"] for d in docs), reverse=True)
        assert len(docs) <= 4
    retriever.close()


@pytest.mark.asyncio
async def test_retriever_async(sdk_daemon: Daemon, observer: MemoryClient) -> None:
    s = observer.create_session("lc-retriever-async")
    s.add_message("user", "The spare key is in the blue flowerpot.")
    for i in range(5):
        s.add_message("tool", noise(i))
    retriever = MemorydRetriever(target=sdk_daemon.address, token=TOKENS["alice"], session_id=s.id, k=2)
    docs = await retriever.ainvoke("where is the spare key?")
    assert "blue flowerpot" in docs[0].page_content and len(docs) <= 2
    missing = MemorydRetriever(target=sdk_daemon.address, token=TOKENS["bob"], session_id=s.id)
    with pytest.raises(NotFound):  # another tenant's session reads as missing
        await missing.ainvoke("where is the spare key?")
