"""telegram/formatting.py: TDLib's own parser (for real, offline), Telegram's rules, escaping."""

from __future__ import annotations

import pytest

from telegram_platform.telegram.content import Entity, FormattedText, ParseMode
from telegram_platform.telegram.formatting import ContentInvalid, check, configure_logging, escape, parse

HOSTILE = ["*bold* _it_ [x](http://evil.example) `code` ~s~ ||sp|| >q \\ . ! # + - = { } ( )",
           "<b>bold</b> <a href=\"http://evil.example\">x</a> &amp; &lt; \" ' <tg-spoiler>s</tg-spoiler>",
           "😀 *_[]()~`>#+-=|{}.!\\ <>&\""]


@pytest.fixture(scope="module", autouse=True)
def quiet() -> None:
    configure_logging(0)


def test_markdown_v2_is_parsed_by_tdlib_with_utf16_offsets() -> None:
    """Bold, an emoji before a link: offsets count the emoji as two UTF-16 units."""
    assert parse("*bold* 😀 [link](https://example.com/)", ParseMode.MARKDOWN) == FormattedText(
        "bold 😀 link", (Entity("bold", 0, 4), Entity("text_link", 8, 4, url="https://example.com/")))


def test_html_is_parsed_by_tdlib() -> None:
    """HTML's tags and entities (&amp;) as TDLib reads them; pre with a language."""
    assert parse('<b>b</b> &amp; <pre><code class="language-py">x</code></pre>', ParseMode.HTML) == \
        FormattedText("b & x", (Entity("bold", 0, 1), Entity("pre", 4, 1, language="py")))


def test_markup_that_does_not_parse_is_refused_in_tdlibs_words() -> None:
    """An unclosed entity, an unescaped special character: ContentInvalid "Can't parse entities"."""
    for text, mode in [("*bold", ParseMode.MARKDOWN), ("1.5", ParseMode.MARKDOWN), ("<b>x</i>", ParseMode.HTML)]:
        with pytest.raises(ContentInvalid, match="Can't parse entities"):
            parse(text, mode)


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("mode", list(ParseMode))
def test_an_escaped_value_is_literal_text(value: str, mode: ParseMode) -> None:
    """Whatever a value holds, escaped for a mode it parses back to itself with no entity."""
    assert parse(escape(value, mode), mode) == FormattedText(value)
    assert parse(f"*{escape(value, mode)}*" if mode is ParseMode.MARKDOWN else f"<b>{escape(value, mode)}</b>",
                 mode).entities == (Entity("bold", 0, len(value.encode("utf-16-le")) // 2),)


def test_telegrams_rules_for_text_and_entities() -> None:
    """4,096 UTF-16 units pass and 4,097 do not; a caption has 1,024; entity bounds, types, fields."""
    assert check(FormattedText("x" * 4096)).text == "x" * 4096
    with pytest.raises(ContentInvalid, match="MESSAGE_TOO_LONG"):
        check(FormattedText("😀" * 2048 + "x"))
    with pytest.raises(ContentInvalid, match="MEDIA_CAPTION_TOO_LONG"):
        check(FormattedText("x" * 1025), caption=True)
    check(FormattedText(""), caption=True)
    with pytest.raises(ContentInvalid, match="MESSAGE_EMPTY"):
        check(FormattedText(" \n"))
    with pytest.raises(ContentInvalid, match="ENTITY_BOUNDS_INVALID"):
        check(FormattedText("😀", (Entity("bold", 1, 2),)))
    with pytest.raises(ContentInvalid, match="ENTITY_TYPE_INVALID"):
        check(FormattedText("x", (Entity("blink", 0, 1),)))
    with pytest.raises(ContentInvalid, match="ENTITY_FIELD_MISSING"):
        check(FormattedText("x", (Entity("custom_emoji", 0, 1),)))
    with pytest.raises(ContentInvalid, match="ENTITIES_TOO_LONG"):
        check(FormattedText("x" * 101, tuple(Entity("bold", i, 1) for i in range(101))))
