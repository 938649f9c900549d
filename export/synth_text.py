"""Deterministic mixed-language text for training and testing synthetic tokenizers.

`corpus_lines(n, seed)` is used twice: to train the BPE of a synthetic checkpoint (one seed) and to
compare tokenizers, e.g. llama.cpp against Hugging Face (another seed). So it deliberately covers the
cases tokenizers get wrong: many scripts, digits, code indentation with tabs, runs of whitespace and
punctuation, URLs, and emoji made of several code points (ZWJ sequences, skin tones, flags).

Everything comes from the small word lists below and `random.Random(seed)`: no files, no network.
A "line" is one sample; code samples contain embedded "\\n" and "\\t". Every line is NFC-normalised,
so a byte-level tokenizer with an NFC normaliser must round-trip it exactly.
"""
from __future__ import annotations

import random
import unicodedata

__all__ = ["corpus_lines"]

ENGLISH = (
    "the quick brown fox jumps over lazy dog a an of to in is it that was for on are with as I his they be "
    "at one have this from or had by hot word but what some we can out other were all there when up use "
    "your how said each she which do their time if will way about many then them write would like so these "
    "her long make thing see him two has look more day could go come did number sound no most people my "
    "over know water than call first who may down side been now find image picture camera phone model "
    "token vision language slice resolution edge device memory battery screen photo street night cat "
    "doesn't can't I'm you're we've they'll she'd it's let's isn't "
    # words of every chat prompt (role names) and of typical questions about an image
    "user assistant system describe detail colour colours color colors question answer there why where"
).split()

CHINESE = (
    "我们 你好 世界 图片 模型 手机 今天 天气 很好 北京 上海 中文 语言 视觉 识别 文字 计算机 人工智能 "
    "学习 问题 回答 这个 那个 什么 为什么 怎么 可以 不是 没有 一个 时间 朋友 东西 猫 狗 山 水 电脑 "
    "请问 谢谢 描述 这张 照片 内容 颜色 红色 蓝色 边缘 设备 内存"
).split()

JAPANESE = (
    "こんにちは ありがとう 日本語 東京 写真 画像 モデル スマートフォン 猫 犬 ですか です ます "
    "これは それは 何 見て ください 今日 天気 いい カメラ コンピュータ ラーメン 桜 富士山 ひらがな カタカナ"
).split()

KOREAN = (
    "안녕하세요 감사합니다 한국어 서울 사진 이미지 모델 스마트폰 고양이 강아지 오늘 날씨 좋아요 "
    "이것은 무엇입니까 설명해 주세요 컴퓨터 카메라 화면 배터리 김치 바다 산"
).split()

RUSSIAN = (
    "привет мир спасибо русский язык Москва фотография изображение модель телефон кошка собака сегодня "
    "погода хорошая что это опишите пожалуйста компьютер камера экран батарея ёжик съешь ещё"
).split()

ARABIC = (
    "مرحبا العالم شكرا اللغة العربية القاهرة صورة نموذج هاتف قطة كلب اليوم الطقس جميل ما هذا "
    "من فضلك حاسوب كاميرا شاشة"
).split()

HINDI = (
    "नमस्ते दुनिया धन्यवाद हिन्दी भाषा दिल्ली तस्वीर मॉडल फ़ोन बिल्ली कुत्ता आज मौसम अच्छा "
    "यह क्या है कृपया कंप्यूटर कैमरा स्क्रीन"
).split()

ACCENTED = (
    "café naïve résumé façade déjà vu crème brûlée garçon Müller Straße über schön Grüße "
    "mañana niño señor árbol canción São Paulo coração ação Łódź zażółć gęślą jaźń "
    "Việt Nam tiếng phở Ærøskøbing smørbrød İstanbul şehir çay Ελλάδα καλημέρα q̃ Dvořák Čeština"
).split()

SCRIPTS = {
    "en": ENGLISH, "zh": CHINESE, "ja": JAPANESE, "ko": KOREAN, "ru": RUSSIAN,
    "ar": ARABIC, "hi": HINDI, "latin": ACCENTED,
}
# CJK is written without spaces between words; every other script separates words with spaces.
NO_SPACE = {"zh", "ja"}

EMOJI = (
    "😀", "😂", "🥲", "😍", "🤖", "🐱", "🐶", "🌸", "🍜", "🚀", "🔥", "✨", "❤️", "✅", "⚠️", "☕",
    "👍🏽", "👋🏻", "🙏🏿", "💪🏼", "🧑🏾‍💻",                      # skin tones (and one ZWJ)
    "👨‍👩‍👧‍👦", "👩‍❤️‍👨", "🏳️‍🌈", "🧑‍🚀", "👁️‍🗨️", "🐻‍❄️",  # ZWJ sequences
    "🇯🇵", "🇨🇳", "🇰🇷", "🇺🇸", "🇩🇪",                        # regional-indicator flags
    "1️⃣", "#️⃣", "©️",                                          # keycaps, variation selector
)

PUNCT = (".", ",", "!", "?", ";", ":", "...", "!!!", "?!", "—", "–", "…", "。", "，", "！", "？", "、",
         "「", "」", "《", "》", "«", "»", "“", "”", "‘", "’", "'", '"', "(", ")", "[", "]", "~~~", "***",
         "---", "===", "##", "@", "&", "%", "$", "€", "£", "¥", "°", "±", "×", "÷", "→", "≤", "≥", "√", "∞")

WHITESPACE = (" ", "  ", "   ", "\t", " \t ", "\t\t", "    ", "\u3000", "\u00a0")

IDENTS = ("x", "y", "i", "n", "count", "total", "image", "pixels", "tokens", "buf", "ctx", "model",
          "width", "height", "result", "data", "items", "value", "idx", "self", "tensor", "scale")

TLDS = ("com", "org", "cn", "jp", "io", "ai", "co.uk", "de", "ru")


def _words(rng: random.Random, lang: str, lo: int, hi: int) -> str:
    """A run of words in one script, spaced the way that script is written."""
    words = [rng.choice(SCRIPTS[lang]) for _ in range(rng.randint(lo, hi))]
    if lang == "en" and rng.random() < 0.5:
        words[0] = words[0].capitalize()
    if rng.random() < 0.1:
        words[0] = words[0].upper()
    return ("" if lang in NO_SPACE else " ").join(words)


def _number(rng: random.Random) -> str:
    """Integers, decimals, dates, times, phone-like, money and version numbers."""
    kind = rng.randrange(10)
    if kind == 0:
        return str(rng.randint(0, 10 ** rng.randint(1, 12)))
    if kind == 1:
        return f"{rng.uniform(-1000, 1000):.{rng.randint(1, 6)}f}"
    if kind == 2:
        return f"{rng.randint(1900, 2099)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if kind == 3:
        return f"{rng.randint(1, 28)}/{rng.randint(1, 12)}/{rng.randint(0, 99):02d}"
    if kind == 4:
        return f"+{rng.randint(1, 99)} ({rng.randint(100, 999)}) {rng.randint(100, 999)}-{rng.randint(1000, 9999)}"
    if kind == 5:
        return f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"
    if kind == 6:
        return f"{rng.choice('$€¥£')}{rng.randint(1, 99999):,}.{rng.randint(0, 99):02d}"
    if kind == 7:
        return f"v{rng.randint(0, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 200)}"
    if kind == 8:
        return f"{rng.randint(0, 100)}%"
    return f"{rng.uniform(0, 9.99):.2f}e{rng.choice('+-')}{rng.randint(1, 30):02d}"


def _url(rng: random.Random) -> str:
    host = rng.choice(("www.", "", "api.", "cdn.")) + rng.choice(("example", "openbmb", "huggingface", "github",
                                                              "test-site", "xn--fsqu00a"))
    path = "/".join(rng.choice(IDENTS) for _ in range(rng.randint(0, 3)))
    url = f"{rng.choice(('https', 'http'))}://{host}.{rng.choice(TLDS)}/{path}"
    if rng.random() < 0.4:
        url += f"?q={rng.choice(IDENTS)}&page={rng.randint(1, 99)}#sec-{rng.randint(1, 9)}"
    if rng.random() < 0.2:
        url = f"{rng.choice(IDENTS)}.{rng.choice(IDENTS)}@{host.strip('.')}.{rng.choice(TLDS)}"
    return url


def _emoji(rng: random.Random) -> str:
    return "".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 3)))


def _code(rng: random.Random) -> str:
    """A few lines of Python, JavaScript or C, indented with spaces or tabs."""
    a, b, c = rng.sample(IDENTS, 3)
    n = rng.randint(0, 999)
    lang = rng.randrange(4)
    if lang == 0:
        ind = rng.choice(("    ", "\t", "  "))
        return (f"def {a}_{b}({c}, n={n}):\n{ind}\"\"\"Return the {a}.\"\"\"\n{ind}for i in range(n):\n"
                f"{ind}{ind}if {c}[i] >= {n / 7:.3f}:  # check\n{ind}{ind}{ind}{c}[i] **= 2\n"
                f"{ind}return {{'{a}': {c}, \"n\": n}}")
    if lang == 1:
        return (f"const {a} = ({b}) => {{\n  if ({b} === null || {b}.length !== {n}) {{\n"
                f"    return `{c}: ${{{b}}}`;\n  }}\n  return {b}.map((v) => v * {n}).filter(Boolean);\n}};")
    if lang == 2:
        return (f"#include <stdio.h>\n\nint {a}(int *{b}, size_t {c}) {{\n\tfor (size_t i = 0; i < {c}; ++i) {{\n"
                f"\t\t{b}[i] += {n};\n\t}}\n\tprintf(\"%d\\n\", {b}[0] >> 2);\n\treturn 0;\n}}")
    return rng.choice((f"  {a}[{n}] = {b} && !{c} || ({a} != {b});", f"\t\t{a}->{b} = {c} << {n % 32};",
                       f"{a}:{b} = {{{c}: [{n}, {n + 1}]}}", f"    # TODO({a}): {b} -> {c}",
                       f"<div class=\"{a}\">{b}</div>", f"SELECT {a}, {b} FROM {c} WHERE id = {n};"))


def _piece(rng: random.Random) -> str:
    """One fragment of a mixed line."""
    r = rng.random()
    if r < 0.55:
        return _words(rng, rng.choice(tuple(SCRIPTS)), 1, 6)
    if r < 0.68:
        return _number(rng)
    if r < 0.78:
        return _emoji(rng)
    if r < 0.86:
        return _url(rng)
    if r < 0.93:
        return rng.choice(PUNCT) * rng.randint(1, 3)
    return rng.choice(IDENTS) + rng.choice(("()", "[0]", ".size", "_t", "->next", "::new"))


def _mixed_line(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 7)):
        parts.append(_piece(rng))
        parts.append(rng.choice(WHITESPACE) if rng.random() < 0.25 else rng.choice((" ", "", " ", ", ", " ")))
    line = "".join(parts).rstrip(" ")
    return line + (rng.choice(PUNCT) if rng.random() < 0.6 else "")


def _sentence_line(rng: random.Random) -> str:
    """A plain sentence in one language, the bulk of real text."""
    lang = rng.choice(tuple(SCRIPTS))
    end = {"zh": "。", "ja": "。"}.get(lang, rng.choice((".", "?", "!", "")))
    body = _words(rng, lang, 3, 14)
    if rng.random() < 0.3:
        body += ("" if lang in NO_SPACE else " ") + _number(rng)
    return body + end


def _whitespace_line(rng: random.Random) -> str:
    """Leading/trailing/repeated whitespace and newlines, which byte-level pre-tokenizers treat specially."""
    pieces = [rng.choice(WHITESPACE) * rng.randint(1, 3)]
    for _ in range(rng.randint(1, 4)):
        pieces.append(_words(rng, rng.choice(("en", "ru", "zh", "latin")), 1, 3))
        pieces.append(rng.choice(WHITESPACE + ("\n", "\n\n", " \n", "\r\n")) * rng.randint(1, 2))
    return "".join(pieces)


_KINDS = ((_sentence_line, 0.35), (_mixed_line, 0.35), (_code, 0.15), (_whitespace_line, 0.10),
          (lambda rng: _emoji(rng) + " " + _words(rng, "en", 1, 4) + " " + _emoji(rng), 0.05))


def corpus_lines(n_lines: int, seed: int) -> list[str]:
    """`n_lines` deterministic, NFC-normalised text samples; the same seed always gives the same list."""
    rng = random.Random(seed)
    makers = [k for k, _ in _KINDS]
    weights = [w for _, w in _KINDS]
    lines = []
    for _ in range(n_lines):
        line = rng.choices(makers, weights)[0](rng)
        lines.append(unicodedata.normalize("NFC", line))
    return lines
