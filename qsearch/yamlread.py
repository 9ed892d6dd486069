"""YAML values straight from libyaml's event stream, for the files qsearch reads (plans, configs).

PyYAML's loaders build a node graph and then construct it, both in Python: a 10,000-layer plan took
2.6 s to read with the C parser. Here the events build the values in one pass: plain scalars are
typed by PyYAML's own resolver and safe constructors (memoized by value: a plan repeats a few words),
mappings are `LinedDict`s that know each key's line, and what `files._Loader` refuses is refused the
same way (aliases, nesting deeper than MAX_DEPTH, list or mapping keys, duplicate keys). Anything
rarer (merge keys, tagged collections) raises `Unusual`, and the caller uses the full loader.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor

STR = "tag:yaml.org,2002:str"
MAP = "tag:yaml.org,2002:map"
SEQ = "tag:yaml.org,2002:seq"
_resolver = yaml.resolver.Resolver()
_constructor = SafeConstructor()
_tags: dict[str, str] = {}  # plain scalar -> its implicit tag


class Unusual(Exception):
    """A construct this reader leaves to the full loader."""


def _scalar(e: yaml.ScalarEvent) -> Any:
    if e.tag not in (None, "!"):
        tag = e.tag
    elif not e.implicit[0]:  # quoted, or the non-specific '!': a string
        return e.value
    else:
        tag = _tags.get(e.value)
        if tag is None:
            tag = _resolver.resolve(yaml.ScalarNode, e.value, (True, False))
            if len(_tags) < 100_000:
                _tags[e.value] = tag
    if tag == STR:
        return e.value
    if tag == "tag:yaml.org,2002:merge":
        raise Unusual  # a merge key: the full loader flattens it
    build = SafeConstructor.yaml_constructors.get(tag)
    if build is None:
        raise ConstructorError(None, None, f"could not determine a constructor for the tag {tag!r}", e.start_mark)
    return build(_constructor, yaml.ScalarNode(tag, e.value, e.start_mark, e.end_mark, e.style))


def load(text: str, mapping_type: type, max_depth: int) -> Any:
    """The document's value (None for an empty one); `mapping_type()` gets `.lines` and `.line`."""
    stack: list[list] = []  # [container, key, key line, expecting a key]
    root, documents = None, 0
    for e in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml when built with it
        kind = type(e)
        if kind is yaml.ScalarEvent:
            value = _scalar(e)
        elif kind is yaml.MappingStartEvent or kind is yaml.SequenceStartEvent:
            if e.tag not in (None, "!", MAP if kind is yaml.MappingStartEvent else SEQ):
                raise Unusual
            if stack and stack[-1][3]:
                raise ConstructorError(None, None, "a mapping key must be a plain value, not a list or mapping",
                                       e.start_mark)
            if len(stack) >= max_depth:
                raise yaml.composer.ComposerError(None, None, f"nested more than {max_depth} levels deep",
                                                  e.start_mark)
            if kind is yaml.MappingStartEvent:
                d = mapping_type()
                d.lines, d.line = {}, e.start_mark.line + 1
                stack.append([d, None, 0, True])
            else:
                stack.append([[], None, 0, False])
            continue
        elif kind is yaml.MappingEndEvent or kind is yaml.SequenceEndEvent:
            value = stack.pop()[0]
        elif kind is yaml.AliasEvent:
            raise yaml.composer.ComposerError(None, None, f"aliases are not allowed (*{e.anchor})", e.start_mark)
        elif kind is yaml.DocumentStartEvent:
            documents += 1
            if documents > 1:
                raise yaml.composer.ComposerError("expected a single document in the stream", None,
                                                  "but found another document", e.start_mark)
            continue
        else:  # stream start/end, document end
            continue
        if not stack:
            root = value
            continue
        top = stack[-1]
        if isinstance(top[0], list):
            top[0].append(value)
        elif top[3]:  # a key
            if value in top[0]:
                raise ConstructorError(None, None, f"duplicate key {value!r}", e.start_mark)
            top[1], top[2], top[3] = value, e.start_mark.line + 1, False
        else:
            top[0][top[1]] = value
            top[0].lines[top[1]] = top[2]
            top[3] = True
    return root
