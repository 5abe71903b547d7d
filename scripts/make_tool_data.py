"""Write dataset/demo/sft_tools.jsonl (tool-use SFT rows) and dataset/demo/agent_rl.jsonl (agent RL prompts), generated
from model/tools.py.  生成工具调用演示数据。

    python scripts/make_tool_data.py                 # byte-identical every time (seeds 1234 and 1235)
    python trainer/train_full_sft.py --data_path dataset/demo/sft_tools.jsonl --from_weight full_sft \
        --save_weight full_sft_tools --max_seq_len 1024      # then scripts/eval_toolcall.py --weight full_sft_tools
    python trainer/train_agent.py --from_weight full_sft_tools                  # then ... --weight agent

Each row is a chat in minimind-3's stored format: a system turn whose ``tools`` (a JSON string) offers the needed
tool(s) and one other, a question in Chinese or English, an assistant turn that calls (``tool_calls``, a JSON
string), the tool's real answer (``tool`` turns: the tools run here, the time tool on a random clock), and an answer
that states the result. About one row in ten asks two things at once (two calls), one in ten needs no tool. Questions,
numbers, countries, elements and time zones are drawn so that no question of scripts/eval_toolcall.py appears (its
countries, elements and cities are left out). The agent RL prompts are drawn the same way (no time questions): the
system turn and question, a placeholder reply, and "gt", the fact each needed call's answer gives. Everything here is
written for this repository, under its licence.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from model.cli import HelpFormatter
from model.tools import CAPITALS, ELEMENTS, Toolbox

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT = REPO_ROOT / "dataset" / "demo" / "sft_tools.jsonl"
AGENT_OUT = REPO_ROOT / "dataset" / "demo" / "agent_rl.jsonl"
SEED, N_ROWS, N_AGENT_ROWS = 1234, 600, 200
HELD_OUT = {"Australia", "Canada", "Turkey", "Japan", "Fe", "Au", "Na"}  # the benchmark's countries and elements
WEEKDAYS_ZH = dict(zip(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"], "一二三四五六日"))
# Each question maker returns (zh question, en question, tool, arguments, zh answer of the result, en answer, fact):
# the answers are formats filled with the tool's result, the fact what an answer must state.
# The agent RL prompts also need the fact the answer must state: (result, language) -> the fact.
Question = tuple[str, str, str, dict, Callable[[dict], str], Callable[[dict], str], Callable[[dict, str], str]]


def the(key: str) -> Callable[[dict, str], str]:
    """The fact of a result that reads the same in both languages: its value under ``key``."""
    return lambda result, lang: str(result[key])


def arithmetic(rng: random.Random) -> Question:
    a, b = rng.randint(12, 999), rng.randint(2, 99)
    zh, en, expression = rng.choice([
        (f"帮我算一下 {a} 乘以 {b}", f"What is {a} times {b}?", f"{a}*{b}"),
        (f"{a} 加 {b} 等于多少？", f"What is {a} plus {b}?", f"{a}+{b}"),
        (f"{a} 减去 {b} 是多少？", f"What is {a} minus {b}?", f"{a}-{b}"),
        (f"{a} 除以 {b} 等于几？", f"What is {a} divided by {b}?", f"{a}/{b}"),
        (f"{b % 11 + 2} 的 {a % 5 + 2} 次方是多少？", f"What is {b % 11 + 2} to the power of {a % 5 + 2}?",
         f"{b % 11 + 2}**{a % 5 + 2}"),
        (f"{b * b} 的平方根是多少？", f"What is the square root of {b * b}?", f"sqrt({b * b})"),
        (f"{a} 的 {b}% 是多少？", f"What is {b}% of {a}?", f"{a}*{b}/100"),
    ])
    return (zh, en, "calculate_math", {"expression": expression}, lambda r: f"{expression} = {r['result']}。",
            lambda r: f"{expression} = {r['result']}.", the("result"))


CONVERSIONS = [  # (from, to, 中文, 中文, English, English)
    ("km", "mile", "公里", "英里", "kilometers", "miles"), ("mile", "km", "英里", "公里", "miles", "kilometers"),
    ("kg", "pound", "千克", "磅", "kilograms", "pounds"), ("pound", "kg", "磅", "千克", "pounds", "kilograms"),
    ("celsius", "fahrenheit", "摄氏度", "华氏度", "degrees Celsius", "degrees Fahrenheit"),
    ("fahrenheit", "celsius", "华氏度", "摄氏度", "degrees Fahrenheit", "degrees Celsius"),
    ("m", "foot", "米", "英尺", "meters", "feet"), ("foot", "m", "英尺", "米", "feet", "meters"),
    ("inch", "cm", "英寸", "厘米", "inches", "centimeters"), ("l", "gallon", "升", "加仑", "liters", "gallons"),
    ("h", "min", "小时", "分钟", "hours", "minutes"), ("jin", "kg", "斤", "千克", "jin", "kilograms"),
]


def conversion(rng: random.Random) -> Question:
    source, target, source_zh, target_zh, source_en, target_en = rng.choice(CONVERSIONS)
    value = rng.choice([rng.randint(1, 200), rng.randint(1, 99) * 5, round(rng.uniform(0.5, 50), 1)])
    zh = rng.choice([f"把{value}{source_zh}换算成{target_zh}", f"{value}{source_zh}等于多少{target_zh}？"])
    en = rng.choice([f"Convert {value} {source_en} to {target_en}.", f"How many {target_en} is {value} {source_en}?"])
    return (zh, en, "unit_converter", {"value": value, "from_unit": source, "to_unit": target},
            lambda r: f"{value}{source_zh}约等于{r['result']}{target_zh}。",
            lambda r: f"{value} {source_en} is about {r['result']} {target_en}.", the("result"))


CITIES = [  # not the benchmark's Tokyo and New York
    ("Asia/Shanghai", "北京", "Beijing"), ("Europe/London", "伦敦", "London"), ("Europe/Paris", "巴黎", "Paris"),
          ("Europe/Berlin", "柏林", "Berlin"), ("America/Los_Angeles", "洛杉矶", "Los Angeles"),
          ("America/Chicago", "芝加哥", "Chicago"), ("Australia/Sydney", "悉尼", "Sydney"),
          ("Asia/Singapore", "新加坡", "Singapore"), ("Asia/Dubai", "迪拜", "Dubai"), ("Asia/Kolkata", "孟买", "Mumbai"),
          ("Europe/Moscow", "莫斯科", "Moscow"), ("Asia/Seoul", "首尔", "Seoul")]


def local_time(rng: random.Random) -> Question:
    zone, city_zh, city_en = rng.choice(CITIES)
    zh = rng.choice([f"{city_zh}现在几点了？", f"现在{city_zh}是几点？", f"{city_zh}今天星期几？"])
    en = rng.choice([f"What time is it in {city_en}?", f"What's the current time in {city_en}?",
                     f"What day of the week is it in {city_en}?"])
    return (zh, en, "get_current_time", {"timezone": zone},
            lambda r: f"{city_zh}现在是 {r['datetime']}，星期{WEEKDAYS_ZH[r['weekday']]}。",
            lambda r: f"It is {r['datetime']} in {city_en}, a {r['weekday']}.", the("datetime"))


def day_count(rng: random.Random) -> Question:
    start = date(2020, 1, 1) + timedelta(days=rng.randint(0, 2500))
    end = start + timedelta(days=rng.randint(1, 800))
    zh_start, zh_end = (f"{d.year}年{d.month}月{d.day}日" for d in (start, end))
    zh = rng.choice([f"从{zh_start}到{zh_end}一共有多少天？", f"{start}和{end}之间相差几天？"])
    en = rng.choice([f"How many days are there from {start} to {end}?", f"How many days between {start} and {end}?"])
    return (zh, en, "days_between", {"start_date": str(start), "end_date": str(end)},
            lambda r: f"相差 {r['days']} 天。", lambda r: f"There are {r['days']} days.", the("days"))


def capital(rng: random.Random) -> Question:
    country, country_zh, *_ = rng.choice([row for row in CAPITALS if row[0] not in HELD_OUT])
    zh = rng.choice([f"{country_zh}的首都是哪里？", f"{country_zh}的首都是哪个城市？"])
    en = rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?"])
    return (zh, en, "get_capital", {"country": country},
            lambda r: f"{r['country_zh']}的首都是{r['capital_zh']}。",
            lambda r: f"The capital of {r['country']} is {r['capital']}.",
            lambda r, lang: r["capital_zh"] if lang == "zh" else r["capital"])


def element(rng: random.Random) -> Question:
    _, symbol, name, name_zh, _ = rng.choice([row for row in ELEMENTS if row[1] not in HELD_OUT])
    key, zh_asks, en_asks = rng.choice([("atomic_number", "原子序数", "atomic number"),
                                        ("symbol", "元素符号", "chemical symbol"),
                                        ("atomic_mass", "原子量", "atomic mass")])
    return (f"{name_zh}的{zh_asks}是多少？", f"What is the {en_asks} of {name.lower()}?", "get_element_info",
            {"element": symbol}, lambda r: f"{r['name_zh']}的{zh_asks}是 {r[key]}。",
            lambda r: f"The {en_asks} of {r['name'].lower()} is {r[key]}.", the(key))


QUESTIONS = [arithmetic, conversion, local_time, day_count, capital, element]
SMALL_TALK = {"zh": [("你好", "你好！我可以帮你计算、换算单位、查时间、查首都和化学元素。"),
                     ("谢谢你的帮助！", "不客气，很高兴能帮到你！"), ("早上好", "早上好！今天有什么需要帮忙的吗？")],
              "en": [("Hi there!", "Hi! I can calculate, convert units, tell the time, and look up capitals and "
                                   "chemical elements."),
                     ("Thanks for your help!", "You're welcome, glad I could help!"),
                     ("Good morning", "Good morning! What can I do for you today?")]}


def combine(questions: list[str], lang: str) -> str:
    """Two questions as one: "…？另外，…" / "… Also, what …"."""
    first, *rest = questions
    if not rest:
        return first
    end = "" if first.endswith(("？", "?", "。", ".")) else "。" if lang == "zh" else "."
    return first + end + ("另外，" + rest[0] if lang == "zh" else " Also, " + rest[0][0].lower() + rest[0][1:])


def draw_chat(rng: random.Random, makers: list[Callable[[random.Random], Question]]) \
        -> tuple[str, list[Question], Toolbox, dict]:
    """A chat's language, its questions (none: small talk, one in ten) and the tools it offers, with the system turn
    that offers them."""
    lang, kind = rng.choice(["zh", "en"]), rng.random()
    clock = datetime(2025, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=rng.randint(0, 3 * 365 * 86400))
    questions = [maker(rng) for maker in rng.sample(makers, 2 if kind < 0.1 else 1)]
    needed = [q[2] for q in questions] if kind < 0.9 else []
    others = [name for name in Toolbox().tools if name not in needed]
    offered = needed + rng.sample(others, 1 if needed else rng.randint(1, 2))  # short rows: CPU demo training
    rng.shuffle(offered)
    toolbox = Toolbox(offered, clock=lambda: clock)
    system = {"role": "system", "content": "", "tools": json.dumps(toolbox.schemas(), ensure_ascii=False)}
    return lang, questions if needed else [], toolbox, system


def make_row(rng: random.Random) -> dict:
    lang, questions, toolbox, system = draw_chat(rng, QUESTIONS)
    if not questions:
        question, answer = rng.choice(SMALL_TALK[lang])
        return {"conversations": [system, {"role": "user", "content": question},
                                  {"role": "assistant", "content": answer}]}
    pick = 0 if lang == "zh" else 1  # the question's language in a Question; its answer is 4 further on
    calls = [{"name": q[2], "arguments": q[3]} for q in questions]
    results = [toolbox.call(q[2], q[3]) for q in questions]
    question = combine([q[pick] for q in questions], lang)
    answer = " ".join(q[4 + pick](result) for q, result in zip(questions, results))
    return {"conversations": [
        system, {"role": "user", "content": question},
        {"role": "assistant", "content": "", "tool_calls": json.dumps(calls, ensure_ascii=False)},
        *({"role": "tool", "content": json.dumps(result, ensure_ascii=False)} for result in results),
        {"role": "assistant", "content": answer}]}


def make_agent_row(rng: random.Random) -> dict:
    """An agent RL prompt in MiniMind's agent_rl.jsonl shape: the system turn with its tools, the question, a
    placeholder reply, and "gt": one fact per call needed (none for small talk). No time questions: their facts hang
    on the clock."""
    lang, questions, toolbox, system = draw_chat(rng, [maker for maker in QUESTIONS if maker is not local_time])
    pick = 0 if lang == "zh" else 1
    question = combine([q[pick] for q in questions], lang) if questions else rng.choice(SMALL_TALK[lang])[0]
    return {"conversations": [system, {"role": "user", "content": question}, {"role": "assistant", "content": ""}],
            "gt": [q[6](toolbox.call(q[2], q[3]), lang) for q in questions]}


def make_rows(n: int = N_ROWS, seed: int = SEED, make: Callable[[random.Random], dict] = make_row) -> list[dict]:
    rng = random.Random(seed)
    return [make(rng) for _ in range(n)]


def write_rows(path: str | Path, rows: list[dict]) -> None:
    Path(path).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"{path}: {len(rows)} rows, {Path(path).stat().st_size / 1e6:.2f} MB")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--agent_out", default=str(AGENT_OUT))
    args = p.parse_args(argv)
    write_rows(args.out, make_rows())
    write_rows(args.agent_out, make_rows(N_AGENT_ROWS, SEED + 1, make_agent_row))


if __name__ == "__main__":
    main()
