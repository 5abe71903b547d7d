"""Tools a chat model may call, how its calls are read, and the loop that runs them. Standard library only: the chat
client (scripts/chat_openai_api.py) uses this module without torch.  模型可调用的工具与工具调用循环。

    toolbox = Toolbox()                           # every tool; Toolbox(["calculate_math"], clock=...) for some
    client.chat.completions.create(..., tools=toolbox.schemas())      # OpenAI's function format
    for message in tool_loop(ask, messages, toolbox, max_rounds=3):   # ask(messages) -> an assistant message
        print(message)

A model calls a tool as the chat template teaches it: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
in its answer; ``split_tool_calls`` reads those (the server, eval_llm.py and scripts/eval_toolcall.py share it). A
tool answers with a JSON object; whatever goes wrong (a block that is not a call, an unknown tool, bad arguments, a
failing tool) becomes ``{"error": "..."}``, which the model reads as the tool's answer. Nothing here runs code: the
calculator walks a parsed expression tree over a whitelist of nodes with bounded sizes, never ``eval``.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timezone as dt_timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


class ToolError(ValueError):
    """A call the tool cannot answer; its message goes back to the model as ``{"error": message}``."""


# ----------------------------------------------------------------------------------------------------------------------
# calculator: arithmetic on a parsed expression tree

MAX_EXPRESSION_CHARS, MAX_NODES, MAX_EXPONENT, MAX_MAGNITUDE = 200, 100, 100, 1e100
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
FUNCTIONS = {"sqrt": math.sqrt, "abs": abs, "round": round, "floor": math.floor, "ceil": math.ceil, "exp": math.exp,
             "log": math.log, "log10": math.log10, "log2": math.log2, "sin": math.sin, "cos": math.cos,
             "tan": math.tan}
CONSTANTS = {"pi": math.pi, "e": math.e}
# What models (and people) write for the operators Python spells otherwise: ^ is a power here, as on a calculator.
SPELLINGS = str.maketrans({"^": "**", "×": "*", "÷": "/", "−": "-", "（": "(", "）": ")", "，": ","})


def calculate_math(expression: str) -> dict[str, Any]:
    """The value of an arithmetic expression: numbers, + - * / // % ** (or ^), parentheses, pi, e and the functions
    in FUNCTIONS. Anything else (names, attributes, strings, comprehensions...) is refused before evaluating."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.translate(SPELLINGS).strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ToolError(f"the expression has more than {MAX_NODES} parts")
    try:
        return {"expression": expression, "result": _number(_evaluate(tree.body))}
    except ToolError:
        raise
    except (ArithmeticError, ValueError, TypeError) as e:  # 1/0, sqrt(-1), exp(1000), floor(1, 2), ...
        raise ToolError(f"cannot compute {expression!r}: {e}") from None


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in CONSTANTS:
        return CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolError(f"exponents are limited to ±{MAX_EXPONENT}")
        return _bounded(BINARY[type(node.op)](left, right))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS
            and not node.keywords and 1 <= len(node.args) <= 2):
        return _bounded(FUNCTIONS[node.func.id](*map(_evaluate, node.args)))
    raise ToolError(f"{ast.unparse(node)!r} is not allowed: use numbers, + - * / // % **, parentheses, "
                    f"{', '.join(CONSTANTS)} and {', '.join(FUNCTIONS)}")


def _bounded(value: Any) -> int | float:
    if isinstance(value, complex) or not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise ToolError(f"the result is too large or not a real number (the limit is {MAX_MAGNITUDE:g})")
    return value


def _number(value: int | float) -> int | float:
    """12.0 -> 12 and 0.1 + 0.2 -> 0.3: what a person would write (12 significant digits)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return float(f"{value:.12g}") if isinstance(value, float) else value


# ----------------------------------------------------------------------------------------------------------------------
# unit conversion

UNITS = {  # unit -> (quantity, size in the quantity's base unit)
    "m": ("length", 1.0), "km": ("length", 1000.0), "cm": ("length", 0.01), "mm": ("length", 0.001),
    "mile": ("length", 1609.344), "yard": ("length", 0.9144), "foot": ("length", 0.3048), "inch": ("length", 0.0254),
    "kg": ("mass", 1.0), "g": ("mass", 0.001), "mg": ("mass", 1e-6), "t": ("mass", 1000.0), "jin": ("mass", 0.5),
    "pound": ("mass", 0.45359237), "ounce": ("mass", 0.028349523125),
    "l": ("volume", 1.0), "ml": ("volume", 0.001), "gallon": ("volume", 3.785411784),
    "s": ("time", 1.0), "min": ("time", 60.0), "h": ("time", 3600.0), "day": ("time", 86400.0),
    "celsius": ("temperature", None), "fahrenheit": ("temperature", None), "kelvin": ("temperature", None),
}
UNIT_NAMES = {
    "meter": "m", "meters": "m", "米": "m", "kilometer": "km", "kilometers": "km", "公里": "km", "千米": "km",
    "centimeter": "cm", "centimeters": "cm", "厘米": "cm", "millimeter": "mm", "millimeters": "mm", "毫米": "mm",
    "miles": "mile", "mi": "mile", "英里": "mile", "yards": "yard", "yd": "yard", "码": "yard", "feet": "foot",
    "ft": "foot", "英尺": "foot", "inches": "inch", "in": "inch", "英寸": "inch",
    "kilogram": "kg", "kilograms": "kg", "千克": "kg", "公斤": "kg", "gram": "g", "grams": "g", "克": "g",
    "milligram": "mg", "milligrams": "mg", "毫克": "mg", "ton": "t", "tons": "t", "tonne": "t", "吨": "t", "斤": "jin",
    "pounds": "pound", "lb": "pound", "lbs": "pound", "磅": "pound", "ounces": "ounce", "oz": "ounce", "盎司": "ounce",
    "liter": "l", "liters": "l", "litre": "l", "litres": "l", "升": "l", "milliliter": "ml", "milliliters": "ml",
    "毫升": "ml", "gallons": "gallon", "gal": "gallon", "加仑": "gallon",
    "second": "s", "seconds": "s", "sec": "s", "秒": "s", "minute": "min", "minutes": "min", "分钟": "min",
    "hour": "h", "hours": "h", "小时": "h", "days": "day", "天": "day",
    "c": "celsius", "°c": "celsius", "℃": "celsius", "摄氏度": "celsius", "f": "fahrenheit", "°f": "fahrenheit",
    "℉": "fahrenheit", "华氏度": "fahrenheit", "k": "kelvin", "开尔文": "kelvin",
}
TO_KELVIN = {"celsius": lambda v: v + 273.15, "fahrenheit": lambda v: (v - 32) * 5 / 9 + 273.15, "kelvin": lambda v: v}
FROM_KELVIN = {"celsius": lambda k: k - 273.15, "fahrenheit": lambda k: (k - 273.15) * 9 / 5 + 32,
               "kelvin": lambda k: k}


def _unit(name: str) -> str:
    key = name.strip().lower()
    key = UNIT_NAMES.get(key, key)
    if key not in UNITS:
        raise ToolError(f"unknown unit {name!r}; known: {', '.join(UNITS)}")
    return key


def unit_converter(value: float, from_unit: str, to_unit: str) -> dict[str, Any]:
    """``value`` in ``from_unit``, expressed in ``to_unit`` (length, mass, volume, time or temperature)."""
    source, target = _unit(from_unit), _unit(to_unit)
    (quantity, size), (target_quantity, target_size) = UNITS[source], UNITS[target]
    if quantity != target_quantity:
        raise ToolError(f"cannot convert {quantity} ({from_unit}) to {target_quantity} ({to_unit})")
    converted = (FROM_KELVIN[target](TO_KELVIN[source](value)) if quantity == "temperature"
                 else value * size / target_size)
    return {"value": value, "from_unit": source, "to_unit": target, "result": _number(float(f"{converted:.6g}"))}


# ----------------------------------------------------------------------------------------------------------------------
# date and time (the clock is an argument of the Toolbox, so tests and benchmarks fix it)

def utc_now() -> datetime:
    return datetime.now(dt_timezone.utc)


def get_current_time(timezone: str = "Asia/Shanghai", *, now: datetime) -> dict[str, Any]:
    """The date, time and weekday now in an IANA time zone (``now`` comes from the Toolbox's clock)."""
    try:
        local = now.astimezone(ZoneInfo(timezone.strip()))
    except (ZoneInfoNotFoundError, ValueError):
        raise ToolError(f"unknown time zone {timezone!r}: use an IANA name such as Asia/Shanghai, Europe/London "
                        "or UTC") from None
    return {"timezone": timezone, "datetime": local.strftime("%Y-%m-%d %H:%M:%S"), "weekday": local.strftime("%A")}


def days_between(start_date: str, end_date: str) -> dict[str, Any]:
    """The number of days from one date (YYYY-MM-DD) to another; negative when the end comes first."""
    try:
        start, end = date.fromisoformat(start_date.strip()), date.fromisoformat(end_date.strip())
    except ValueError:
        raise ToolError(f"dates must be written YYYY-MM-DD, got {start_date!r} and {end_date!r}") from None
    return {"start_date": start.isoformat(), "end_date": end.isoformat(), "days": (end - start).days}


# ----------------------------------------------------------------------------------------------------------------------
# lookups over fixed data

CAPITALS = [  # (country, 国家, capital, 首都, other names of the country)
    ("China", "中国", "Beijing", "北京", ()), ("Japan", "日本", "Tokyo", "东京", ()),
    ("South Korea", "韩国", "Seoul", "首尔", ("korea",)), ("India", "印度", "New Delhi", "新德里", ()),
    ("France", "法国", "Paris", "巴黎", ()), ("Germany", "德国", "Berlin", "柏林", ()),
    ("United Kingdom", "英国", "London", "伦敦", ("uk", "britain", "great britain", "england")),
    ("Italy", "意大利", "Rome", "罗马", ()), ("Spain", "西班牙", "Madrid", "马德里", ()),
    ("Russia", "俄罗斯", "Moscow", "莫斯科", ()),
    ("United States", "美国", "Washington, D.C.", "华盛顿", ("usa", "us", "america", "united states of america")),
    ("Canada", "加拿大", "Ottawa", "渥太华", ()), ("Mexico", "墨西哥", "Mexico City", "墨西哥城", ()),
    ("Brazil", "巴西", "Brasília", "巴西利亚", ()), ("Argentina", "阿根廷", "Buenos Aires", "布宜诺斯艾利斯", ()),
    ("Australia", "澳大利亚", "Canberra", "堪培拉", ()), ("New Zealand", "新西兰", "Wellington", "惠灵顿", ()),
    ("Egypt", "埃及", "Cairo", "开罗", ()), ("Kenya", "肯尼亚", "Nairobi", "内罗毕", ()),
    ("Turkey", "土耳其", "Ankara", "安卡拉", ("türkiye",)), ("Thailand", "泰国", "Bangkok", "曼谷", ()),
    ("Vietnam", "越南", "Hanoi", "河内", ()), ("Indonesia", "印度尼西亚", "Jakarta", "雅加达", ("印尼",)),
    ("Switzerland", "瑞士", "Bern", "伯尔尼", ()), ("Netherlands", "荷兰", "Amsterdam", "阿姆斯特丹", ()),
    ("Sweden", "瑞典", "Stockholm", "斯德哥尔摩", ()), ("Norway", "挪威", "Oslo", "奥斯陆", ()),
    ("Greece", "希腊", "Athens", "雅典", ()), ("Portugal", "葡萄牙", "Lisbon", "里斯本", ()),
    ("Poland", "波兰", "Warsaw", "华沙", ()),
]
ELEMENTS = [  # (atomic number, symbol, name, 名称, standard atomic mass)
    (1, "H", "Hydrogen", "氢", 1.008), (2, "He", "Helium", "氦", 4.0026), (3, "Li", "Lithium", "锂", 6.94),
    (4, "Be", "Beryllium", "铍", 9.0122), (5, "B", "Boron", "硼", 10.81), (6, "C", "Carbon", "碳", 12.011),
    (7, "N", "Nitrogen", "氮", 14.007), (8, "O", "Oxygen", "氧", 15.999), (9, "F", "Fluorine", "氟", 18.998),
    (10, "Ne", "Neon", "氖", 20.18), (11, "Na", "Sodium", "钠", 22.99), (12, "Mg", "Magnesium", "镁", 24.305),
    (13, "Al", "Aluminium", "铝", 26.982), (14, "Si", "Silicon", "硅", 28.085), (15, "P", "Phosphorus", "磷", 30.974),
    (16, "S", "Sulfur", "硫", 32.06), (17, "Cl", "Chlorine", "氯", 35.45), (18, "Ar", "Argon", "氩", 39.95),
    (19, "K", "Potassium", "钾", 39.098), (20, "Ca", "Calcium", "钙", 40.078), (26, "Fe", "Iron", "铁", 55.845),
    (29, "Cu", "Copper", "铜", 63.546), (30, "Zn", "Zinc", "锌", 65.38), (47, "Ag", "Silver", "银", 107.87),
    (50, "Sn", "Tin", "锡", 118.71), (53, "I", "Iodine", "碘", 126.9), (78, "Pt", "Platinum", "铂", 195.08),
    (79, "Au", "Gold", "金", 196.97), (80, "Hg", "Mercury", "汞", 200.59), (82, "Pb", "Lead", "铅", 207.2),
    (92, "U", "Uranium", "铀", 238.03),
]
_COUNTRIES = {name.casefold(): row for row in CAPITALS for name in (row[0], row[1], *row[4])}
_ELEMENTS = {str(key).casefold(): row for row in ELEMENTS for key in row[:4]}


def get_capital(country: str) -> dict[str, Any]:
    """The capital of a country (English or Chinese name)."""
    row = _COUNTRIES.get(country.strip().casefold())
    if row is None:
        raise ToolError(f"no capital known for {country!r}; known countries: {', '.join(r[0] for r in CAPITALS)}")
    return {"country": row[0], "country_zh": row[1], "capital": row[2], "capital_zh": row[3]}


def get_element_info(element: str) -> dict[str, Any]:
    """A chemical element's symbol, names, atomic number and standard atomic mass."""
    row = _ELEMENTS.get(element.strip().casefold())
    if row is None:
        raise ToolError(f"unknown element {element!r}: give a symbol (Fe), a name (iron, 铁) or an atomic number; "
                        f"known: {', '.join(r[1] for r in ELEMENTS)}")
    return {"atomic_number": row[0], "symbol": row[1], "name": row[2], "name_zh": row[3], "atomic_mass": row[4]}


# ----------------------------------------------------------------------------------------------------------------------
# the tools as a model sees them (OpenAI's function format) and how calls reach them

@dataclass(frozen=True)
class Tool:
    function: Callable[..., dict[str, Any]]
    description: str
    parameters: dict[str, Any]  # a JSON schema of an object: properties, required
    uses_clock: bool = False  # the function takes now=<the Toolbox's clock()>

    @property
    def name(self) -> str:
        return self.function.__name__

    def schema(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def _object(required: dict[str, dict], optional: dict[str, dict] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": {**required, **(optional or {})}, "required": list(required)}


TOOLS = [  # short descriptions in both languages: every prompt carries them (90-150 tokens a tool)
    Tool(calculate_math, "Evaluate an arithmetic expression 计算数学表达式",
         _object({"expression": {"type": "string", "description": "e.g. 256*37, 2**10, sqrt(144)"}})),
    Tool(unit_converter, "Convert a value between units 单位换算",
         _object({"value": {"type": "number"}, "from_unit": {"type": "string", "description": "e.g. km, kg, celsius"},
                  "to_unit": {"type": "string"}})),
    Tool(get_current_time, "The date, time and weekday in a time zone 当前时间",
         _object({}, {"timezone": {"type": "string", "description": "e.g. Asia/Shanghai", "default": "Asia/Shanghai"}}),
         uses_clock=True),
    Tool(days_between, "Days from one date to another (YYYY-MM-DD) 日期间隔天数",
         _object({"start_date": {"type": "string"}, "end_date": {"type": "string"}})),
    Tool(get_capital, "The capital of a country 首都", _object({"country": {"type": "string"}})),
    Tool(get_element_info, "A chemical element's symbol, atomic number and mass 化学元素",
         _object({"element": {"type": "string", "description": "symbol, name or atomic number"}})),
]
JSON_TYPES = {"string": (str,), "number": (int, float), "integer": (int,), "boolean": (bool,)}


def check_arguments(tool: Tool, arguments: dict[str, Any]) -> None:
    """Refuse (ToolError) arguments that do not fit the tool's schema: unknown or missing names, wrong JSON types."""
    properties, required = tool.parameters["properties"], tool.parameters["required"]
    if unknown := [name for name in arguments if name not in properties]:
        raise ToolError(f"{tool.name} has no argument {', '.join(map(repr, unknown))}; it takes "
                        f"{', '.join(properties) or 'none'}")
    if missing := [name for name in required if name not in arguments]:
        raise ToolError(f"{tool.name} needs the argument {', '.join(map(repr, missing))}")
    for name, value in arguments.items():
        kind = properties[name]["type"]
        if not isinstance(value, JSON_TYPES[kind]) or (isinstance(value, bool) and kind != "boolean"):
            raise ToolError(f"{tool.name}: {name!r} must be a {kind}, got {json.dumps(value, ensure_ascii=False)}")


class Toolbox:
    """The tools offered in one chat (default: all of TOOLS), run by name with JSON arguments."""

    def __init__(self, names: Iterable[str] | None = None, clock: Callable[[], datetime] = utc_now):
        known = {tool.name: tool for tool in TOOLS}
        names = list(known) if names is None else list(names)
        if unknown := [name for name in names if name not in known]:
            raise ValueError(f"unknown tool {', '.join(unknown)}; the tools are {', '.join(known)}")
        self.tools, self.clock = {name: known[name] for name in names}, clock

    def schemas(self) -> list[dict[str, Any]]:
        return [tool.schema() for tool in self.tools.values()]

    def call(self, name: str, arguments: str | dict[str, Any]) -> dict[str, Any]:
        """The tool's answer, or ``{"error": ...}`` saying what was wrong with the call."""
        try:
            if name not in self.tools:
                raise ToolError(f"unknown tool {name!r}; the tools are {', '.join(self.tools) or 'none'}")
            tool = self.tools[name]
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments) if arguments.strip() else {}
                except json.JSONDecodeError as e:
                    raise ToolError(f"the arguments of {name} are not valid JSON ({e})") from None
            if not isinstance(arguments, dict):
                raise ToolError(f"the arguments of {name} must be a JSON object")
            check_arguments(tool, arguments)
            return tool.function(**arguments, **({"now": self.clock()} if tool.uses_clock else {}))
        except ToolError as e:
            return {"error": str(e)}
        except Exception as e:  # a bug in a tool: the model (and whoever reads the transcript) sees it, the chat goes on
            return {"error": f"{name} failed: {type(e).__name__}: {e}"}

    def answer(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """The ``tool`` turns that answer an assistant message: one per call it made, and one error per block of its
        content that tried to be a call and is not one (so the model learns what went wrong)."""
        turns = []
        for call in message.get("tool_calls") or []:
            result = self.call(call["function"]["name"], call["function"]["arguments"])
            turns.append({"role": "tool", **({"tool_call_id": call["id"]} if call.get("id") else {}),
                          "content": json.dumps(result, ensure_ascii=False)})
        for error in malformed_tool_calls(message.get("content") or ""):
            turns.append({"role": "tool", "content": json.dumps({"error": error}, ensure_ascii=False)})
        return turns


def tool_loop(ask: Callable[[list[dict[str, Any]]], dict[str, Any] | None], messages: list[dict[str, Any]],
              toolbox: Toolbox, max_rounds: int = 3) -> Iterator[dict[str, Any]]:
    """Ask for a reply; while it calls tools, run them and ask again, at most ``max_rounds`` times. Yields every new
    message in order: the assistant replies (``ask``'s, OpenAI-shaped) and the tool turns answering them. Ends at a
    reply without calls, after ``max_rounds`` rounds of calls (the last reply's calls then go unanswered), or when
    ``ask`` returns None (it failed, or was interrupted)."""
    history = list(messages)
    for round_ in range(max_rounds + 1):
        reply = ask(history)
        if reply is None:
            return
        yield reply
        history.append(reply)
        turns = toolbox.answer(reply) if round_ < max_rounds else []
        if not turns:
            return
        yield from turns
        history += turns


def chat_exchange(ask: Callable[[list[dict[str, Any]]], dict[str, Any] | None], messages: list[dict[str, Any]],
                  toolbox: Toolbox | None, max_rounds: int = 3) -> list[dict[str, Any]] | None:
    """One exchange of a chat (eval_llm.py, scripts/chat_openai_api.py): the new messages answering ``messages`` (with
    a toolbox, the tool loop's, each tool's answer printed as it comes). None when a reply failed or was interrupted:
    the chat then drops the whole exchange from its history."""
    new = []
    for message in tool_loop(ask, messages, toolbox or Toolbox([]), max_rounds if toolbox else 0):
        if message["role"] == "tool":
            print(f"🔧 {message['content']}", flush=True)
        new.append(message)
    return new if new and new[-1]["role"] == "assistant" else None  # else the loop stopped at a failed reply


# ----------------------------------------------------------------------------------------------------------------------
# reading calls from a reply

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"  # how the chat template shows a call
TOOL_CALL = re.compile(re.escape(TOOL_CALL_START) + "(.*?)" + re.escape(TOOL_CALL_END), re.DOTALL)


def read_tool_call(body: str) -> dict[str, Any]:
    """One call in OpenAI's shape (arguments as a JSON string, a fresh id) from the JSON between the tags; ToolError
    saying why when it is not ``{"name": ..., "arguments": {...}}``."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError as e:
        raise ToolError(f"a <tool_call> that is not valid JSON ({e}): {body.strip()[:200]}") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        raise ToolError('a <tool_call> must hold {"name": <tool name>, "arguments": {...}}, got ' + body.strip()[:200])
    arguments = call.get("arguments", {})
    if isinstance(arguments, dict):
        arguments = json.dumps(arguments, ensure_ascii=False)  # OpenAI's clients expect a JSON string
    elif not isinstance(arguments, str):
        raise ToolError(f"the arguments of {call['name']} must be a JSON object, got {json.dumps(arguments)}")
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": arguments}}


def split_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """``text`` without its ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, and those calls as
    OpenAI's ``tool_calls``. A block whose JSON does not read as a call stays in the text."""
    kept, calls, end = [], [], 0
    for block in TOOL_CALL.finditer(text):
        try:
            calls.append(read_tool_call(block.group(1)))
        except ToolError:
            continue
        kept.append(text[end:block.start()])
        end = block.end()
    kept.append(text[end:])
    return "".join(kept), calls


def malformed_tool_calls(text: str) -> list[str]:
    """Why each ``<tool_call>`` left in ``text`` (by split_tool_calls) is no call; also one never closed."""
    errors = []
    for block in TOOL_CALL.finditer(text):
        try:
            read_tool_call(block.group(1))
        except ToolError as e:
            errors.append(str(e))
    if TOOL_CALL_START in TOOL_CALL.sub("", text):
        errors.append(f"a {TOOL_CALL_START} without {TOOL_CALL_END} (was the reply cut short?)")
    return errors


def assistant_turn(content: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """An assistant message as OpenAI returns one: with calls, the text around them stripped (None when empty)."""
    if not calls:
        return {"role": "assistant", "content": content}
    return {"role": "assistant", "content": content.strip() or None, "tool_calls": calls}
