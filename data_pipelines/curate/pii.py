"""Redaction of e-mail addresses, IP addresses and phone numbers with fixed placeholders.

Rule-based and conservative: a miss is preferred over mangling ordinary numbers. Heuristics:

* E-mail: local@domain.tld with an alphabetic TLD of 2+ letters. Obfuscated forms ("user at
  example dot com") are not matched.
* IPv4: four dot-separated decimal octets 0-255 without leading zeros, not part of a longer
  dotted or alphanumeric run (so "1.2.3.4.5" and "256.1.1.1" are left alone). A four-part version
  number such as "1.2.3.4" is indistinguishable from an address and is redacted.
* IPv6: colon-hex candidates (optionally ending in dotted IPv4) accepted only if the standard library
  `ipaddress` parses them, e.g. "2001:db8::1", "::1", "fe80::1ff:fe23:4567:890a". Clock times such as
  "12:30:45" never parse.
* Phone numbers: every pattern requires digit groups with separators (space, ".", "-", "/" or
  parentheses), except "+" international numbers, which may be written solid:
  - international: "+" country code, then groups; 8-15 digits in total (E.164 allows at most 15);
  - North American: (NXX) NXX-XXXX / NXX-NXX-XXXX / NXX.NXX.XXXX / NXX NXX XXXX with an area code
    starting 2-9, optionally preceded by "1-" or "1 ";
  - European national: trunk prefix 0 (e.g. "030 1234567", "06 12 34 56 78", "020 7946 0958",
    "089/1234567"), 9-12 digits in total.
  Hence never matched: years ("2024"), ISO dates ("2024-01-15": no group of 3-3-4 and no leading 0),
  day-first dates ("15.01.2024", "01/02/2024": fewer than 9 digits), version numbers ("1.2.3"),
  plain numbers ("1,234,567", "3.14159") and long digit IDs without separators ("4915112345678").
  Digit runs glued to letters, other digits or hyphenated number chains (ISBNs) are not matched.
"""

from __future__ import annotations

import ipaddress
import re

EMAIL = "<EMAIL>"
IP_ADDRESS = "<IP_ADDRESS>"
PHONE = "<PHONE>"

_EMAIL_RE = re.compile(
  # The look-behind anchors matches at the start of a local-part run: linear time on long tokens.
  r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
  r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}(?![\w-])"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4_RE = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)")
_IPV6_CANDIDATE_RE = re.compile(
  r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}|:)?(?::[0-9A-Fa-f]{0,4}){2,7}(?:\.\d{1,3}){0,3}(?![\w:])"
)
_PHONE_RE = re.compile(
  r"(?<![\w+/.-])(?:"
  # International: +CC and the number written solid, or in groups separated by space/dot/hyphen
  # with an optional parenthesised group (e.g. "+49 (0)30 1234567").
  r"\+[1-9]\d{7,14}"
  r"|\+[1-9]\d{0,2}(?:[ .-]?\(\d{1,4}\))?[ .-]?\d{1,5}(?:[ .-]\d{1,8}){0,5}"
  # North American Numbering Plan.
  r"|(?:1[ .-])?(?:\([2-9]\d\d\) ?|[2-9]\d\d[ .-])\d{3}[ .-]\d{4}"
  # European national numbers with trunk prefix 0.
  r"|(?:\(0\d{1,4}\) ?|0\d{1,4}[ /.-])\d{2,8}(?:[ .-]\d{2,8}){0,4}"
  r")(?![\w]|[.-]\d)"
)


def _valid_ipv6(candidate: str) -> bool:
  """True for a real IPv6 address (at least one group, so a bare "::" is not)."""
  if candidate == "::":
    return False
  try:
    ipaddress.IPv6Address(candidate)
  except ValueError:
    return False
  return True


def _valid_phone(candidate: str) -> bool:
  """Digit-count limits: international 8-15, NANP 10-11, European national 9-12."""
  digits = sum(c.isdigit() for c in candidate)
  if candidate.startswith("+"):
    return 8 <= digits <= 15
  if candidate.lstrip("(").startswith("0"):
    return 9 <= digits <= 12
  return 10 <= digits <= 11


def redact(text: str) -> tuple[str, dict[str, int]]:
  """Replace e-mails, IPv4/IPv6 addresses and phone numbers with placeholders; count each kind.

  Returns (redacted text, {"email": n, "ip_address": n, "phone": n}). E-mails are replaced first,
  then IPv6, IPv4, phones, so an address is never re-read as a phone number.
  """
  counts = {"email": 0, "ip_address": 0, "phone": 0}
  if "@" in text:
    text, counts["email"] = _EMAIL_RE.subn(EMAIL, text)

  def ipv6(match: re.Match[str]) -> str:
    if _valid_ipv6(match.group()):
      counts["ip_address"] += 1
      return IP_ADDRESS
    return match.group()

  if "::" in text or text.count(":") >= 7:
    text = _IPV6_CANDIDATE_RE.sub(ipv6, text)
  text, n_ipv4 = _IPV4_RE.subn(IP_ADDRESS, text)
  counts["ip_address"] += n_ipv4

  def phone(match: re.Match[str]) -> str:
    if _valid_phone(match.group()):
      counts["phone"] += 1
      return PHONE
    return match.group()

  text = _PHONE_RE.sub(phone, text)
  return text, counts
