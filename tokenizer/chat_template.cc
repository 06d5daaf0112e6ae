#include "tokenizer/chat_template.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <ctime>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <optional>
#include <vector>

#include "base/json_util.h"
#include "tokenizer/utf8.h"

namespace kraken::tokenizer {

using json = nlohmann::ordered_json;

// ---------------------------------------------------------------------------------------------
// Lexing: the source becomes text pieces and tags; a tag's inside becomes tokens.

namespace {

enum class Tok { kName, kString, kInt, kFloat, kOp, kEnd };

struct Token {
  Tok type = Tok::kEnd;
  std::string text;  // name, string value, number spelling or operator
  int line = 1;
};

enum class PieceKind { kText, kOutput, kStatement };

struct Piece {
  PieceKind kind = PieceKind::kText;
  std::string text;           // kText
  std::vector<Token> tokens;  // kOutput, kStatement (ends with kEnd)
  int line = 1;
};

Status ErrorAt(int line, std::string_view what) {
  return InvalidArgument("chat template line ", line, ": ", what);
}

bool IsNameStart(char c) {
  return std::isalpha(static_cast<unsigned char>(c)) || c == '_';
}
bool IsNameChar(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) || c == '_';
}

// The tokens of one tag's inside.
StatusOr<std::vector<Token>> Tokenize(std::string_view s, int line) {
  static const char* const kOps[] = {"==", "!=", "<=", ">=", "//", "**", "<", ">", "+", "-", "*", "/", "%",
                                     "~",  "|",  ".",  ",",  ":",  "(",  ")", "[", "]", "{", "}", "="};
  std::vector<Token> out;
  size_t i = 0;
  while (i < s.size()) {
    const char c = s[i];
    if (c == '\n') ++line;
    if (std::isspace(static_cast<unsigned char>(c))) {
      ++i;
      continue;
    }
    if (IsNameStart(c)) {
      size_t j = i;
      while (j < s.size() && IsNameChar(s[j])) ++j;
      out.push_back({Tok::kName, std::string(s.substr(i, j - i)), line});
      i = j;
      continue;
    }
    if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t j = i;
      bool is_float = false;
      while (j < s.size() && (std::isdigit(static_cast<unsigned char>(s[j])) || s[j] == '_')) ++j;
      if (j + 1 < s.size() && s[j] == '.' && std::isdigit(static_cast<unsigned char>(s[j + 1]))) {
        is_float = true;
        ++j;
        while (j < s.size() && std::isdigit(static_cast<unsigned char>(s[j]))) ++j;
      }
      if (j < s.size() && (s[j] == 'e' || s[j] == 'E')) {  // an exponent: 1e16, 2.5e-7
        size_t k = j + 1;
        if (k < s.size() && (s[k] == '+' || s[k] == '-')) ++k;
        if (k < s.size() && std::isdigit(static_cast<unsigned char>(s[k]))) {
          is_float = true;
          j = k;
          while (j < s.size() && std::isdigit(static_cast<unsigned char>(s[j]))) ++j;
        }
      }
      std::string digits;
      for (size_t k = i; k < j; ++k)
        if (s[k] != '_') digits += s[k];
      out.push_back({is_float ? Tok::kFloat : Tok::kInt, digits, line});
      i = j;
      continue;
    }
    if (c == '"' || c == '\'') {
      std::string value;
      size_t j = i + 1;
      for (; j < s.size() && s[j] != c; ++j) {
        if (s[j] != '\\' || j + 1 >= s.size()) {
          value += s[j];
          continue;
        }
        const char e = s[++j];
        value += e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
      }
      if (j >= s.size()) return ErrorAt(line, "a string literal is not closed");
      out.push_back({Tok::kString, std::move(value), line});
      i = j + 1;
      continue;
    }
    bool matched = false;
    for (const char* op : kOps) {
      const std::string_view o(op);
      if (s.substr(i, o.size()) == o) {
        out.push_back({Tok::kOp, std::string(o), line});
        i += o.size();
        matched = true;
        break;
      }
    }
    if (!matched) return ErrorAt(line, StrCat("unexpected character '", std::string(1, c), "'"));
  }
  out.push_back({Tok::kEnd, "", line});
  return out;
}

int CountLines(std::string_view s) {
  return static_cast<int>(std::count(s.begin(), s.end(), '\n'));
}

// Splits the source into pieces, applying whitespace control ({%- -%}) and jinja2's trim_blocks
// (the newline after a block or comment tag goes) and lstrip_blocks (spaces and tabs before a
// block or comment tag on its line go).
StatusOr<std::vector<Piece>> Split(std::string_view src) {
  std::vector<Piece> pieces;
  size_t pos = 0;
  int line = 1;
  bool strip_next = false;    // a "-" closed the previous tag
  bool newline_next = false;  // trim_blocks: drop one newline after a block or comment tag
  bool line_start = true;     // the text being read starts a line (lstrip_blocks)
  while (pos <= src.size()) {
    size_t open = src.find('{', pos);
    while (open != std::string_view::npos && open + 1 < src.size() && src[open + 1] != '{' && src[open + 1] != '%' &&
           src[open + 1] != '#')
      open = src.find('{', open + 1);
    if (open != std::string_view::npos && open + 1 >= src.size()) open = std::string_view::npos;
    std::string text(src.substr(pos, open == std::string_view::npos ? std::string_view::npos : open - pos));
    const int text_line = line;
    line += CountLines(text);
    if (strip_next) {
      text.erase(0, text.find_first_not_of(" \t\r\n"));
      if (text.find_first_not_of(" \t\r\n") == std::string::npos) text.clear();
    } else if (newline_next && !text.empty() && text[0] == '\n') {
      text.erase(0, 1);
      line_start = true;
    }
    strip_next = newline_next = false;
    if (open == std::string_view::npos) {
      if (!text.empty()) pieces.push_back({PieceKind::kText, std::move(text), {}, text_line});
      break;
    }
    const char kind = src[open + 1];
    const bool minus_open = open + 2 < src.size() && src[open + 2] == '-';
    const std::string_view close = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
    const size_t inner_begin = open + 2 + (minus_open ? 1 : 0);
    const size_t close_at = src.find(close, inner_begin);
    if (close_at == std::string_view::npos) return ErrorAt(line, StrCat("a tag opened here is not closed by ", close));
    const bool minus_close = close_at > inner_begin && src[close_at - 1] == '-';
    if (minus_open) {
      const size_t keep = text.find_last_not_of(" \t\r\n");
      text.erase(keep == std::string::npos ? 0 : keep + 1);
    } else if (kind != '{') {  // lstrip_blocks
      const size_t nl = text.find_last_of('\n');
      const size_t from = nl == std::string::npos ? 0 : nl + 1;
      if (text.find_first_not_of(" \t", from) == std::string::npos && (nl != std::string::npos || line_start))
        text.erase(from);
    }
    if (!text.empty()) pieces.push_back({PieceKind::kText, std::move(text), {}, text_line});
    const std::string_view inner = src.substr(inner_begin, close_at - inner_begin - (minus_close ? 1 : 0));
    if (kind != '#') {
      KRAKEN_ASSIGN_OR_RETURN(std::vector<Token> tokens, Tokenize(inner, line));
      pieces.push_back({kind == '{' ? PieceKind::kOutput : PieceKind::kStatement, "", std::move(tokens), line});
    }
    line += CountLines(src.substr(open, close_at + 2 - open));
    pos = close_at + 2;
    strip_next = minus_close;
    newline_next = kind != '{';
    line_start = false;
  }
  return pieces;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The syntax tree.

struct Expr {
  enum Kind {
    kLiteral,
    kName,
    kAttr,
    kItem,
    kSlice,
    kCall,
    kFilter,
    kTest,
    kNeg,
    kNot,
    kBinary,
    kAnd,
    kOr,
    kCond,
    kList,
    kDict
  } kind = kLiteral;
  json value;                               // kLiteral
  std::string name;                         // kName, kAttr, kFilter, kTest, kBinary (the operator)
  std::vector<std::shared_ptr<Expr>> args;  // operands, call or filter arguments, list items, dict k/v
  std::vector<std::pair<std::string, std::shared_ptr<Expr>>> kwargs;
  bool negated = false;  // kTest: "is not"
  int line = 1;
};
using ExprPtr = std::shared_ptr<Expr>;

struct ChatTemplate::Node {
  enum Kind { kSequence, kText, kOutput, kIf, kFor, kSet, kBreak, kContinue } kind = kSequence;
  std::string text;                                                 // kText
  ExprPtr expr;                                                     // kOutput, kSet value, kFor iterable
  std::vector<std::pair<ExprPtr, std::shared_ptr<Node>>> branches;  // kIf: (condition or null, body)
  std::vector<std::string> targets;                                 // kFor names; kSet: name [, attribute]
  ExprPtr filter;                                                   // kFor: "if" condition
  std::vector<std::shared_ptr<Node>> children;                      // kSequence; kFor: body, else
  int line = 1;
};
using Node = ChatTemplate::Node;
using NodePtr = std::shared_ptr<Node>;

namespace {

// ---------------------------------------------------------------------------------------------
// Parsing.

constexpr int kMaxNesting = 64;

class ExprParser {
 public:
  explicit ExprParser(const std::vector<Token>& t) : t_(t) {}

  const Token& Peek(size_t k = 0) const { return t_[std::min(i_ + k, t_.size() - 1)]; }
  bool AtEnd() const { return Peek().type == Tok::kEnd; }
  bool IsOp(std::string_view op, size_t k = 0) const { return Peek(k).type == Tok::kOp && Peek(k).text == op; }
  bool IsName(std::string_view n, size_t k = 0) const { return Peek(k).type == Tok::kName && Peek(k).text == n; }
  Token Next() { return t_[std::min(i_++, t_.size() - 1)]; }
  Status Expect(std::string_view op) {
    if (!IsOp(op)) return ErrorAt(Peek().line, StrCat("expected '", op, "', got '", Peek().text, "'"));
    ++i_;
    return absl::OkStatus();
  }
  StatusOr<std::string> ExpectName() {
    if (Peek().type != Tok::kName) return ErrorAt(Peek().line, StrCat("expected a name, got '", Peek().text, "'"));
    return Next().text;
  }

  StatusOr<ExprPtr> Expression(int depth = 0) {
    if (depth > kMaxNesting) return ErrorAt(Peek().line, "expressions nest too deeply");
    KRAKEN_ASSIGN_OR_RETURN(ExprPtr e, Or(depth));
    if (!IsName("if")) return e;
    ++i_;
    KRAKEN_ASSIGN_OR_RETURN(ExprPtr cond, Or(depth));
    ExprPtr otherwise;
    if (IsName("else")) {
      ++i_;
      KRAKEN_ASSIGN_OR_RETURN(otherwise, Expression(depth + 1));
    }
    return Make(Expr::kCond, {cond, e, otherwise});
  }

 private:
  // Expressions are small; a long chain of operators (a ~ a ~ ...) would build a tree as deep as
  // it is long, which evaluating and freeing walk recursively: refused past kMaxExprNodes.
  static constexpr int kMaxExprNodes = 1000;
  Status Size() const {
    if (nodes_ <= kMaxExprNodes) return absl::OkStatus();
    return ErrorAt(Peek().line, StrCat("an expression of more than ", kMaxExprNodes, " parts"));
  }

  ExprPtr Make(Expr::Kind kind, std::vector<ExprPtr> args, std::string name = "") {
    ++nodes_;
    auto e = std::make_shared<Expr>();
    e->kind = kind;
    e->args = std::move(args);
    e->name = std::move(name);
    e->line = Peek().line;
    return e;
  }

  StatusOr<ExprPtr> Or(int depth) {
    KRAKEN_ASSIGN_OR_RETURN(ExprPtr e, And(depth));
    while (IsName("or")) {
      ++i_;
      KRAKEN_ASSIGN_OR_RETURN(ExprPtr r, And(depth));
      e = Make(Expr::kOr, {e, r});
      KRAKEN_RETURN_IF_ERROR(Size());
    }
    return e;
  }
  StatusOr<ExprPtr> And(int depth) {
    KRAKEN_ASSIGN_OR_RETURN(ExprPtr e, Not(depth));
    while (IsName("and")) {
      ++i_;
      KRAKEN_ASSIGN_OR_RETURN(ExprPtr r, Not(depth));
      e = Make(Expr::kAnd, {e, r});
      KRAKEN_RETURN_IF_ERROR(Size());
    }
    return e;
  }
  StatusOr<ExprPtr> Not(int depth) {
    if (IsName("not")) {
      ++i_;
      if (depth > kMaxNesting) return ErrorAt(Peek().line, "expressions nest too deeply");
      KRAKEN_ASSIGN_OR_RETURN(ExprPtr e, Not(depth + 1));
      return Make(Expr::kNot, {e});
    }
    return Compare(depth);
  }
  StatusOr<ExprPtr> Compare(int depth) {
    KRAKEN_ASSIGN_OR_RETURN(ExprPtr e, Binary(depth, 0));
    while (true) {
      std::string op;
      if (IsOp("==") || IsOp("!=") || IsOp("<") || IsOp(">") || IsOp("<=") || IsOp(">=")) {
        op = Next().text;
      } else if (IsName("in")) {
        ++i_;
        op = "in";
      } else if (IsName("not") && IsName("in", 1)) {
        i_ += 2;
        op = "not in";
      } else {
        return e;
      }
      KRAKEN_ASSIGN_OR_RETURN(ExprPtr r, Binary(depth, 0));
      e = Make(Expr::kBinary, {e, r}, op);
      KRAKEN_RETURN_IF_ERROR(Size());
    }
  }
  // Binary operators by precedence level: ~, then + -, then * / // %, then **.
  StatusOr<ExprPtr> Binary(int depth, int level) {
    static const std::vector<std::vector<std::string>> kLevels = {{"~"}, {"+", "-"}, {"*", "/", "//", "%"}, {"**"}};
    if (level == static_cast<int>(kLevels.size())) return Unary(depth);
    KRAKEN_ASSIGN_OR_RETURN(ExprPtr e, Binary(depth, level + 1));
    while (Peek().type == Tok::kOp &&
           std::find(kLevels[level].begin(), kLevels[level].end(), Peek().text) != kLevels[level].end()) {
      const std::string op = Next().text;
      KRAKEN_ASSIGN_OR_RETURN(ExprPtr r, Binary(depth, level + 1));
      e = Make(Expr::kBinary, {e, r}, op);
      KRAKEN_RETURN_IF_ERROR(Size());
    }
    return e;
  }
  StatusOr<ExprPtr> Unary(int depth) {
    if (IsOp("-") || IsOp("+")) {
      const bool neg = Next().text == "-";
      if (depth > kMaxNesting) return ErrorAt(Peek().line, "expressions nest too deeply");
      KRAKEN_ASSIGN_OR_RETURN(ExprPtr e, Unary(depth + 1));
      return neg ? Make(Expr::kNeg, {e}) : e;
    }
    KRAKEN_ASSIGN_OR_RETURN(ExprPtr e, Primary(depth));
    return Postfix(e, depth, /*filters=*/true);
  }
  StatusOr<ExprPtr> Postfix(ExprPtr e, int depth, bool filters) {
    while (true) {
      KRAKEN_RETURN_IF_ERROR(Size());
      if (IsOp(".")) {
        ++i_;
        KRAKEN_ASSIGN_OR_RETURN(std::string name, ExpectName());
        e = Make(Expr::kAttr, {e}, name);
      } else if (IsOp("[")) {
        ++i_;
        KRAKEN_ASSIGN_OR_RETURN(e, Subscript(e, depth));
      } else if (IsOp("(")) {
        ++i_;
        ExprPtr call = Make(Expr::kCall, {e});
        KRAKEN_RETURN_IF_ERROR(Arguments(call.get(), depth));
        e = call;
      } else if (filters && IsOp("|")) {
        ++i_;
        KRAKEN_ASSIGN_OR_RETURN(std::string name, ExpectName());
        ExprPtr f = Make(Expr::kFilter, {e}, name);
        if (IsOp("(")) {
          ++i_;
          KRAKEN_RETURN_IF_ERROR(Arguments(f.get(), depth));
        }
        e = f;
      } else if (filters && IsName("is")) {
        ++i_;
        ExprPtr t = Make(Expr::kTest, {e});
        if (IsName("not")) {
          ++i_;
          t->negated = true;
        }
        KRAKEN_ASSIGN_OR_RETURN(t->name, ExpectName());
        if (IsOp("(")) {
          ++i_;
          KRAKEN_RETURN_IF_ERROR(Arguments(t.get(), depth));
        } else if (Peek().type == Tok::kString || Peek().type == Tok::kInt || Peek().type == Tok::kFloat ||
                   (Peek().type == Tok::kName && !IsName("and") && !IsName("or") && !IsName("if") && !IsName("else") &&
                    !IsName("in") && !IsName("not") && !IsName("is"))) {
          KRAKEN_ASSIGN_OR_RETURN(ExprPtr arg, Primary(depth));
          t->args.push_back(arg);
        }
        e = t;
      } else {
        return e;
      }
    }
  }
  // After "[": an index or a slice a:b:c, then "]".
  StatusOr<ExprPtr> Subscript(ExprPtr e, int depth) {
    std::vector<ExprPtr> parts(1);
    bool slice = false;
    while (!IsOp("]")) {
      if (IsOp(":")) {
        ++i_;
        slice = true;
        parts.emplace_back();
        continue;
      }
      if (parts.back() != nullptr) return ErrorAt(Peek().line, "expected ':' or ']' in a subscript");
      KRAKEN_ASSIGN_OR_RETURN(parts.back(), Expression(depth + 1));
      if (AtEnd()) return ErrorAt(Peek().line, "a subscript is not closed");
    }
    ++i_;
    if (!slice) {
      if (parts[0] == nullptr) return ErrorAt(Peek().line, "an empty subscript");
      return Make(Expr::kItem, {e, parts[0]});
    }
    if (parts.size() > 3) return ErrorAt(Peek().line, "a slice has at most three parts");
    parts.resize(3);
    return Make(Expr::kSlice, {e, parts[0], parts[1], parts[2]});
  }
  // After "(": positional and keyword arguments, then ")".
  Status Arguments(Expr* call, int depth) {
    while (!IsOp(")")) {
      if (Peek().type == Tok::kName && IsOp("=", 1)) {
        const std::string key = Next().text;
        ++i_;
        KRAKEN_ASSIGN_OR_RETURN(ExprPtr v, Expression(depth + 1));
        call->kwargs.emplace_back(key, v);
      } else {
        KRAKEN_ASSIGN_OR_RETURN(ExprPtr v, Expression(depth + 1));
        call->args.push_back(v);
      }
      if (IsOp(",")) {
        ++i_;
      } else if (!IsOp(")")) {
        return ErrorAt(Peek().line, StrCat("expected ',' or ')' in an argument list, got '", Peek().text, "'"));
      }
    }
    ++i_;
    return absl::OkStatus();
  }
  StatusOr<ExprPtr> Primary(int depth) {
    const Token t = Next();
    switch (t.type) {
      case Tok::kString: {
        std::string s = t.text;
        while (Peek().type == Tok::kString) s += Next().text;  // adjacent literals join, as in Python
        ExprPtr e = Make(Expr::kLiteral, {});
        e->value = s;
        return e;
      }
      case Tok::kInt:
      case Tok::kFloat: {
        ExprPtr e = Make(Expr::kLiteral, {});
        if (t.type == Tok::kInt) {
          int64_t v = 0;
          if (std::from_chars(t.text.data(), t.text.data() + t.text.size(), v).ec != std::errc())
            return ErrorAt(t.line, StrCat("the integer ", t.text, " is too large"));
          e->value = v;
        } else {
          e->value = std::strtod(t.text.c_str(), nullptr);
        }
        return e;
      }
      case Tok::kName: {
        ExprPtr e = Make(Expr::kLiteral, {});
        if (t.text == "true" || t.text == "True")
          e->value = true;
        else if (t.text == "false" || t.text == "False")
          e->value = false;
        else if (t.text == "none" || t.text == "None")
          e->value = nullptr;
        else
          e = Make(Expr::kName, {}, t.text);
        return e;
      }
      case Tok::kOp:
        if (t.text == "(") {
          KRAKEN_ASSIGN_OR_RETURN(ExprPtr e, Expression(depth + 1));
          if (IsOp(",")) {  // a tuple: a list here
            ExprPtr list = Make(Expr::kList, {e});
            while (IsOp(",")) {
              ++i_;
              if (IsOp(")")) break;
              KRAKEN_ASSIGN_OR_RETURN(ExprPtr item, Expression(depth + 1));
              list->args.push_back(item);
            }
            e = list;
          }
          KRAKEN_RETURN_IF_ERROR(Expect(")"));
          return e;
        }
        if (t.text == "[" || t.text == "{") {
          const bool dict = t.text == "{";
          ExprPtr e = Make(dict ? Expr::kDict : Expr::kList, {});
          while (!IsOp(dict ? "}" : "]")) {
            KRAKEN_ASSIGN_OR_RETURN(ExprPtr item, Expression(depth + 1));
            e->args.push_back(item);
            if (dict) {
              KRAKEN_RETURN_IF_ERROR(Expect(":"));
              KRAKEN_ASSIGN_OR_RETURN(ExprPtr v, Expression(depth + 1));
              e->args.push_back(v);
            }
            if (IsOp(","))
              ++i_;
            else if (!IsOp(dict ? "}" : "]"))
              return ErrorAt(Peek().line, "expected ',' in a list or dict");
          }
          ++i_;
          return e;
        }
        break;
      case Tok::kEnd:
        return ErrorAt(t.line, "an expression is missing");
    }
    return ErrorAt(t.line, StrCat("unexpected '", t.text, "'"));
  }

  const std::vector<Token>& t_;
  size_t i_ = 0;
  int nodes_ = 0;
};

// Statements: builds the tree from the pieces, block by block.
class StatementParser {
 public:
  explicit StatementParser(std::vector<Piece> pieces) : p_(std::move(pieces)) {}

  // Parses until a statement named in `ends` (returned in *end, its parser positioned after the
  // name) or the end of the source (`ends` empty).
  StatusOr<NodePtr> Block(const std::vector<std::string>& ends, std::string* end, int depth) {
    if (depth > kMaxNesting) return ErrorAt(Line(), "blocks nest too deeply");
    auto seq = std::make_shared<Node>();
    seq->kind = Node::kSequence;
    while (i_ < p_.size()) {
      Piece& piece = p_[i_++];
      if (piece.kind == PieceKind::kText) {
        auto n = std::make_shared<Node>();
        n->kind = Node::kText;
        n->text = std::move(piece.text);
        seq->children.push_back(n);
        continue;
      }
      ExprParser ep(piece.tokens);
      if (piece.kind == PieceKind::kOutput) {
        auto n = std::make_shared<Node>();
        n->kind = Node::kOutput;
        n->line = piece.line;
        KRAKEN_ASSIGN_OR_RETURN(n->expr, ep.Expression());
        if (!ep.AtEnd()) return ErrorAt(piece.line, StrCat("unexpected '", ep.Peek().text, "' in {{ }}"));
        seq->children.push_back(n);
        continue;
      }
      KRAKEN_ASSIGN_OR_RETURN(const std::string keyword, ep.ExpectName());
      if (std::find(ends.begin(), ends.end(), keyword) != ends.end()) {
        *end = keyword;
        current_ = std::make_unique<ExprParser>(std::move(ep));
        return seq;
      }
      KRAKEN_ASSIGN_OR_RETURN(NodePtr n, Statement(keyword, ep, piece, depth));
      if (n != nullptr) seq->children.push_back(n);
    }
    if (!ends.empty())
      return ErrorAt(Line(), StrCat("the source ends inside a block: expected {% ", ends.back(), " %}"));
    return seq;
  }

 private:
  int Line() const { return i_ > 0 && i_ <= p_.size() ? p_[i_ - 1].line : 1; }

  StatusOr<NodePtr> Statement(const std::string& keyword, ExprParser& ep, const Piece& piece, int depth) {
    auto n = std::make_shared<Node>();
    n->line = piece.line;
    if (keyword == "if") return If(ep, depth);
    if (keyword == "for") return For(ep, piece, depth);
    if (keyword == "set") {
      n->kind = Node::kSet;
      KRAKEN_ASSIGN_OR_RETURN(std::string name, ep.ExpectName());
      n->targets.push_back(name);
      if (ep.IsOp(".")) {
        ep.Next();
        KRAKEN_ASSIGN_OR_RETURN(std::string attr, ep.ExpectName());
        n->targets.push_back(attr);
      }
      if (!ep.IsOp("=")) return ErrorAt(piece.line, "{% set %} without '=' (block set) is not supported");
      ep.Next();
      KRAKEN_ASSIGN_OR_RETURN(n->expr, ep.Expression());
    } else if (keyword == "break" || keyword == "continue") {
      if (loops_ == 0) return ErrorAt(piece.line, StrCat("{% ", keyword, " %} outside a loop"));
      n->kind = keyword == "break" ? Node::kBreak : Node::kContinue;
    } else if (keyword == "generation") {  // transformers' assistant-mask marker: its body renders as is
      std::string end;
      KRAKEN_ASSIGN_OR_RETURN(NodePtr body, Block({"endgeneration"}, &end, depth + 1));
      KRAKEN_RETURN_IF_ERROR(Ended(*current_, end));
      return body;
    } else {
      return ErrorAt(piece.line, StrCat("{% ", keyword, " %} is not supported in chat templates here"));
    }
    KRAKEN_RETURN_IF_ERROR(Ended(ep, keyword));
    return n;
  }

  StatusOr<NodePtr> If(ExprParser& first, int depth) {
    auto n = std::make_shared<Node>();
    n->kind = Node::kIf;
    KRAKEN_ASSIGN_OR_RETURN(ExprPtr cond, first.Expression());
    KRAKEN_RETURN_IF_ERROR(Ended(first, "if"));
    while (true) {
      std::string end;
      KRAKEN_ASSIGN_OR_RETURN(NodePtr body, Block({"elif", "else", "endif"}, &end, depth + 1));
      n->branches.emplace_back(cond, body);
      if (end == "endif") {
        KRAKEN_RETURN_IF_ERROR(Ended(*current_, end));
        return n;
      }
      if (end == "else") {
        KRAKEN_RETURN_IF_ERROR(Ended(*current_, end));
        std::string last;
        KRAKEN_ASSIGN_OR_RETURN(NodePtr tail, Block({"endif"}, &last, depth + 1));
        KRAKEN_RETURN_IF_ERROR(Ended(*current_, last));
        n->branches.emplace_back(nullptr, tail);
        return n;
      }
      KRAKEN_ASSIGN_OR_RETURN(cond, current_->Expression());
      KRAKEN_RETURN_IF_ERROR(Ended(*current_, "elif"));
    }
  }

  // Nothing may follow a statement's own parts ({% if a b %} is an error, not "if a").
  Status Ended(const ExprParser& ep, std::string_view keyword) const {
    if (ep.AtEnd()) return absl::OkStatus();
    return ErrorAt(ep.Peek().line, StrCat("unexpected '", ep.Peek().text, "' in {% ", keyword, " %}"));
  }

  StatusOr<NodePtr> For(ExprParser& ep, const Piece& piece, int depth) {
    auto n = std::make_shared<Node>();
    n->kind = Node::kFor;
    n->line = piece.line;
    do {
      if (!n->targets.empty()) ep.Next();
      KRAKEN_ASSIGN_OR_RETURN(std::string name, ep.ExpectName());
      n->targets.push_back(name);
    } while (ep.IsOp(","));
    if (!ep.IsName("in")) return ErrorAt(piece.line, "expected 'in' in {% for %}");
    ep.Next();
    // The iterable stops before a filter condition's "if" (a conditional expression needs "else").
    KRAKEN_ASSIGN_OR_RETURN(n->expr, ep.Expression());
    if (n->expr->kind == Expr::kCond && n->expr->args[2] == nullptr) {
      n->filter = n->expr->args[0];
      n->expr = n->expr->args[1];
    }
    if (ep.IsName("recursive")) return ErrorAt(piece.line, "recursive loops are not supported");
    KRAKEN_RETURN_IF_ERROR(Ended(ep, "for"));
    std::string end;
    ++loops_;
    StatusOr<NodePtr> body = Block({"else", "endfor"}, &end, depth + 1);
    --loops_;
    if (!body.ok()) return body.status();
    KRAKEN_RETURN_IF_ERROR(Ended(*current_, end));
    n->children.push_back(*body);
    if (end == "else") {
      KRAKEN_ASSIGN_OR_RETURN(NodePtr otherwise, Block({"endfor"}, &end, depth + 1));
      KRAKEN_RETURN_IF_ERROR(Ended(*current_, end));
      n->children.push_back(otherwise);
    }
    return n;
  }

  std::vector<Piece> p_;
  size_t i_ = 0;
  std::unique_ptr<ExprParser> current_;  // the parser of the statement that ended the last block
  int loops_ = 0;                        // for-loops around the statement being read
};

}  // namespace

StatusOr<ChatTemplate> ChatTemplate::Parse(std::string_view source) {
  if (source.size() > kMaxSourceBytes)
    return InvalidArgument("chat template is ", source.size(), " bytes; the limit is ", kMaxSourceBytes);
  if (!IsValidUtf8(source)) return InvalidArgument("chat template is not valid UTF-8");
  // As jinja2 reads a template: \r\n and \r become \n, and one trailing newline goes.
  std::string text;
  text.reserve(source.size());
  for (size_t i = 0; i < source.size(); ++i) {
    if (source[i] != '\r') {
      text += source[i];
    } else {
      text += '\n';
      if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
    }
  }
  if (!text.empty() && text.back() == '\n') text.pop_back();
  KRAKEN_ASSIGN_OR_RETURN(std::vector<Piece> pieces, Split(text));
  StatementParser parser(std::move(pieces));
  std::string end;
  KRAKEN_ASSIGN_OR_RETURN(NodePtr root, parser.Block({}, &end, 0));
  ChatTemplate t;
  t.root_ = root;
  return t;
}

// ---------------------------------------------------------------------------------------------
// Rendering.

namespace {

// A value: immutable JSON shared by every copy (a lookup of `messages` copies a pointer, not the
// conversation), a namespace (mutable, shared), or undefined.
struct Value {
  enum Kind { kUndefined, kJson, kNamespace } kind = kUndefined;
  std::shared_ptr<const json> j;  // kJson
  std::shared_ptr<json> ns;       // kNamespace: its attributes, shared by every copy
  std::string name;               // kUndefined: what was looked up, for messages

  static Value Of(json v) {
    Value x;
    x.kind = kJson;
    x.j = std::make_shared<const json>(std::move(v));
    return x;
  }
  static Value Undefined(std::string what) {
    Value x;
    x.name = std::move(what);
    return x;
  }
  bool undefined() const { return kind == kUndefined; }
  const json& J() const {
    static const json null;
    return kind == kNamespace ? *ns : kind == kJson ? *j : null;
  }
};

// Python's repr of a float, as jinja2 prints it: the shortest digits that read back the same, in
// fixed notation for exponents in [-4, 16) (with ".0" when integral), else as 1.5e+20 / 1e-05.
std::string FloatText(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  if (d == 0) return std::signbit(d) ? "-0.0" : "0.0";
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, std::fabs(d), std::chars_format::scientific);
  const std::string sci(buf, r.ptr);  // "d.ddde+XX" or "de+XX"
  const size_t e = sci.find('e');
  std::string digits = sci.substr(0, e);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  const int exp = std::stoi(sci.substr(e + 1));
  std::string out = d < 0 ? "-" : "";
  if (exp >= -4 && exp < 16) {
    if (exp >= 0) {
      std::string whole = digits.substr(0, std::min<size_t>(digits.size(), static_cast<size_t>(exp) + 1));
      whole.append(static_cast<size_t>(exp) + 1 - whole.size(), '0');
      const std::string frac = digits.size() > whole.size() ? digits.substr(whole.size()) : "";
      return out + whole + "." + (frac.empty() ? "0" : frac);
    }
    return out + "0." + std::string(static_cast<size_t>(-exp - 1), '0') + digits;
  }
  out += digits.substr(0, 1);
  if (digits.size() > 1) out += "." + digits.substr(1);
  char ebuf[16];
  std::snprintf(ebuf, sizeof ebuf, "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
  return out + ebuf;
}

std::string PyRepr(const json& v);

// str() of a value, as jinja2 prints it.
std::string Text(const json& v) {
  switch (v.type()) {
    case json::value_t::null:
      return "None";
    case json::value_t::boolean:
      return v.get<bool>() ? "True" : "False";
    case json::value_t::string:
      return v.get<std::string>();
    case json::value_t::number_integer:
      return std::to_string(v.get<int64_t>());
    case json::value_t::number_unsigned:
      return std::to_string(v.get<uint64_t>());
    case json::value_t::number_float:
      return FloatText(v.get<double>());
    default:
      return PyRepr(v);
  }
}

std::string PyRepr(const json& v) {
  if (v.is_string()) {
    const std::string s = v.get<std::string>();
    const bool dq = s.find('\'') != std::string::npos && s.find('"') == std::string::npos;
    std::string out(1, dq ? '"' : '\'');
    for (char c : s) {
      if (c == '\\')
        out += "\\\\";
      else if (c == '\n')
        out += "\\n";
      else if (c == '\t')
        out += "\\t";
      else if (c == '\r')
        out += "\\r";
      else if (c == (dq ? '"' : '\''))
        out += std::string("\\") + c;
      else
        out += c;
    }
    return out + (dq ? '"' : '\'');
  }
  if (v.is_array()) {
    std::string out = "[";
    for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + PyRepr(v[i]);
    return out + "]";
  }
  if (v.is_object()) {
    std::string out = "{";
    bool first = true;
    for (const auto& [k, x] : v.items()) {
      out += (first ? "" : ", ") + PyRepr(json(k)) + ": " + PyRepr(x);
      first = false;
    }
    return out + "}";
  }
  return Text(v);
}

// A JSON string as Python's json.dumps(ensure_ascii=False) writes it.
void JsonString(const std::string& s, std::string* out) {
  *out += '"';
  for (unsigned char c : s) {
    if (c == '"')
      *out += "\\\"";
    else if (c == '\\')
      *out += "\\\\";
    else if (c == '\n')
      *out += "\\n";
    else if (c == '\r')
      *out += "\\r";
    else if (c == '\t')
      *out += "\\t";
    else if (c == '\b')
      *out += "\\b";
    else if (c == '\f')
      *out += "\\f";
    else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      *out += buf;
    } else {
      *out += static_cast<char>(c);
    }
  }
  *out += '"';
}

// Python's json.dumps(v, ensure_ascii=False, indent, sort_keys=False), as transformers' tojson
// filter calls it (separators ", " and ": ", or "," and ": " with an indent).
void JsonDump(const json& v, int indent, int level, std::string* out) {
  auto newline = [&](int lv) {
    if (indent < 0) return;
    *out += '\n';
    out->append(static_cast<size_t>(indent * lv), ' ');
  };
  const char* comma = indent < 0 ? ", " : ",";
  switch (v.type()) {
    case json::value_t::array: {
      if (v.empty()) {
        *out += "[]";
        return;
      }
      *out += '[';
      for (size_t i = 0; i < v.size(); ++i) {
        if (i) *out += comma;
        newline(level + 1);
        JsonDump(v[i], indent, level + 1, out);
      }
      newline(level);
      *out += ']';
      return;
    }
    case json::value_t::object: {
      if (v.empty()) {
        *out += "{}";
        return;
      }
      *out += '{';
      bool first = true;
      for (const auto& [k, x] : v.items()) {
        if (!first) *out += comma;
        first = false;
        newline(level + 1);
        JsonDump(json(k), indent, level + 1, out);
        *out += ": ";
        JsonDump(x, indent, level + 1, out);
      }
      newline(level);
      *out += '}';
      return;
    }
    case json::value_t::string:
      JsonString(v.get_ref<const std::string&>(), out);
      return;
    case json::value_t::null:
      *out += "null";
      return;
    case json::value_t::boolean:
      *out += v.get<bool>() ? "true" : "false";
      return;
    case json::value_t::number_float: {
      const double d = v.get<double>();
      *out += std::isnan(d) ? "NaN" : std::isinf(d) ? (d > 0 ? "Infinity" : "-Infinity") : FloatText(d);
      return;
    }
    default:
      *out += Text(v);
  }
}

bool Truthy(const Value& x) {
  if (x.undefined()) return false;
  if (x.kind == Value::kNamespace) return true;
  const json& v = x.J();
  switch (v.type()) {
    case json::value_t::null:
      return false;
    case json::value_t::boolean:
      return v.get<bool>();
    case json::value_t::string:
    case json::value_t::array:
    case json::value_t::object:
      return !v.empty();
    case json::value_t::number_float:
      return v.get<double>() != 0;
    default:
      return v.get<int64_t>() != 0;
  }
}

// Code points of a UTF-8 string, as Python's str indexes them.
std::vector<std::string> CodePoints(const std::string& s) {
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    const size_t n = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    out.push_back(s.substr(i, n));
    i += n;
  }
  return out;
}

bool IsSpace(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

std::string Strip(const std::string& s, const std::string* chars, bool left, bool right) {
  auto strip = [&](char c) { return chars ? chars->find(c) != std::string::npos : IsSpace(c); };
  size_t b = 0, e = s.size();
  while (left && b < e && strip(s[b])) ++b;
  while (right && e > b && strip(s[e - 1])) --e;
  return s.substr(b, e - b);
}

enum class Flow { kNormal, kBreak, kContinue };

class Renderer {
 public:
  explicit Renderer(const json& context) {
    scopes_.emplace_back();
    for (const auto& [k, v] : context.items()) scopes_.back()[k] = Value::Of(v);
  }

  StatusOr<std::string> Run(const Node& root) {
    Flow flow = Flow::kNormal;
    KRAKEN_RETURN_IF_ERROR(Render(root, &flow));
    return std::move(out_);
  }

 private:
  Status Step(int line) {
    if (++steps_ > ChatTemplate::kMaxRenderSteps)
      return ErrorAt(line, StrCat("rendering took more than ", ChatTemplate::kMaxRenderSteps, " steps"));
    if (out_.size() > ChatTemplate::kMaxRenderBytes)
      return ErrorAt(line, StrCat("the rendered prompt passed ", ChatTemplate::kMaxRenderBytes, " bytes"));
    return absl::OkStatus();
  }

  Value* Lookup(const std::string& name) {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto f = it->find(name);
      if (f != it->end()) return &f->second;
    }
    return nullptr;
  }

  Status Render(const Node& n, Flow* flow) {
    KRAKEN_RETURN_IF_ERROR(Step(n.line));
    switch (n.kind) {
      case Node::kSequence:
        for (const NodePtr& c : n.children) {
          KRAKEN_RETURN_IF_ERROR(Render(*c, flow));
          if (*flow != Flow::kNormal) return absl::OkStatus();
        }
        return absl::OkStatus();
      case Node::kText:
        out_ += n.text;
        return absl::OkStatus();
      case Node::kOutput: {
        KRAKEN_ASSIGN_OR_RETURN(Value v, Eval(*n.expr));
        if (!v.undefined()) out_ += v.kind == Value::kNamespace ? "<Namespace>" : Text(v.J());
        return absl::OkStatus();
      }
      case Node::kIf:
        for (const auto& [cond, body] : n.branches) {
          bool take = cond == nullptr;
          if (!take) {
            KRAKEN_ASSIGN_OR_RETURN(Value c, Eval(*cond));
            take = Truthy(c);
          }
          if (take) return Render(*body, flow);
        }
        return absl::OkStatus();
      case Node::kFor:
        return For(n, flow);
      case Node::kSet: {
        KRAKEN_ASSIGN_OR_RETURN(Value v, Eval(*n.expr));
        if (n.targets.size() == 1) {
          scopes_.back()[n.targets[0]] = std::move(v);
          return absl::OkStatus();
        }
        Value* ns = Lookup(n.targets[0]);
        if (ns == nullptr || ns->kind != Value::kNamespace)
          return ErrorAt(n.line,
                         StrCat("'", n.targets[0], "' is not a namespace; only a namespace's attributes can be set"));
        (*ns->ns)[n.targets[1]] = v.J();
        return absl::OkStatus();
      }
      case Node::kBreak:
        *flow = Flow::kBreak;
        return absl::OkStatus();
      case Node::kContinue:
        *flow = Flow::kContinue;
        return absl::OkStatus();
    }
    return absl::OkStatus();
  }

  Status For(const Node& n, Flow* flow) {
    KRAKEN_ASSIGN_OR_RETURN(Value seq, Eval(*n.expr));
    json items = json::array();
    const json& v = seq.J();
    if (seq.undefined()) return ErrorAt(n.line, StrCat("'", seq.name, "' is undefined"));
    if (v.is_array())
      items = v;
    else if (v.is_object())
      for (const auto& [k, x] : v.items()) items.push_back(k);
    else if (v.is_string())
      for (const std::string& c : CodePoints(v.get<std::string>())) items.push_back(c);
    else
      return ErrorAt(n.line, StrCat("a ", v.type_name(), " is not iterable"));
    scopes_.emplace_back();
    // A filter condition decides which items count (loop.index and loop.length count those).
    if (n.filter != nullptr) {
      json kept = json::array();
      for (const json& item : items) {
        KRAKEN_RETURN_IF_ERROR(Bind(n, item));
        KRAKEN_ASSIGN_OR_RETURN(Value keep, Eval(*n.filter));
        if (Truthy(keep)) kept.push_back(item);
      }
      items = std::move(kept);
    }
    const int64_t len = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < len; ++i) {
      scopes_.back().clear();  // what an iteration sets is gone in the next, as in jinja2
      KRAKEN_RETURN_IF_ERROR(Bind(n, items[i]));
      scopes_.back()["loop"] = Value::Of(json{{"index", i + 1},
                                              {"index0", i},
                                              {"revindex", len - i},
                                              {"revindex0", len - i - 1},
                                              {"first", i == 0},
                                              {"last", i == len - 1},
                                              {"length", len}});
      Flow inner = Flow::kNormal;
      KRAKEN_RETURN_IF_ERROR(Render(*n.children[0], &inner));
      if (inner == Flow::kBreak) break;
    }
    scopes_.pop_back();
    if (len == 0 && n.children.size() > 1) return Render(*n.children[1], flow);
    return absl::OkStatus();
  }

  Status Bind(const Node& n, const json& item) {
    if (n.targets.size() == 1) {
      scopes_.back()[n.targets[0]] = Value::Of(item);
      return absl::OkStatus();
    }
    if (!item.is_array() || item.size() != n.targets.size())
      return ErrorAt(n.line, StrCat("cannot unpack ", PyRepr(item), " into ", n.targets.size(), " names"));
    for (size_t k = 0; k < n.targets.size(); ++k) scopes_.back()[n.targets[k]] = Value::Of(item[k]);
    return absl::OkStatus();
  }

  StatusOr<Value> Eval(const Expr& e);
  StatusOr<Value> Attribute(const Value& obj, const std::string& name, int line);
  StatusOr<Value> Item(const Value& obj, const Value& key, int line);
  StatusOr<Value> Slice(const Expr& e);
  StatusOr<Value> Call(const Expr& e);
  StatusOr<Value> Method(const Value& obj, const std::string& name, const std::vector<Value>& args, int line);
  StatusOr<Value> Filter(const Expr& e);
  StatusOr<Value> SequenceFilter(const Expr& e, const Value& x, const std::vector<Value>& args);
  StatusOr<std::optional<Value>> Kwarg(const Expr& e, const std::vector<Value>& args, const char* key, size_t pos);
  StatusOr<Value> Test(const Expr& e);
  StatusOr<Value> Binary(const std::string& op, const Value& a, const Value& b, int line);
  StatusOr<std::vector<Value>> Args(const Expr& e, size_t from);

  std::vector<std::map<std::string, Value>> scopes_;
  std::string out_;
  int64_t steps_ = 0;
};

bool IsNumber(const json& v) {
  return v.is_number() && !v.is_boolean();
}
bool IsInt(const json& v) {
  return v.is_number_integer() || v.is_number_unsigned() || v.is_boolean();
}

// Python's slice(start, stop, step).indices(len): the positions a slice takes.
std::vector<int64_t> SliceIndices(int64_t len, std::optional<int64_t> a, std::optional<int64_t> b, int64_t step) {
  auto clamp = [&](std::optional<int64_t> x, int64_t dflt, int64_t lo, int64_t hi) {
    if (!x) return dflt;
    int64_t v = *x < 0 ? *x + len : *x;
    return std::clamp(v, lo, hi);
  };
  std::vector<int64_t> out;
  if (step > 0) {
    const int64_t start = clamp(a, 0, 0, len), stop = clamp(b, len, 0, len);
    for (int64_t i = start; i < stop; i += step) out.push_back(i);
  } else {
    const int64_t start = clamp(a, len - 1, -1, len - 1), stop = clamp(b, -1, -1, len - 1);
    for (int64_t i = start; i > stop; i += step) out.push_back(i);
  }
  return out;
}

StatusOr<Value> Renderer::Eval(const Expr& e) {
  KRAKEN_RETURN_IF_ERROR(Step(e.line));
  switch (e.kind) {
    case Expr::kLiteral:
      return Value::Of(e.value);
    case Expr::kName: {
      Value* v = Lookup(e.name);
      return v != nullptr ? *v : Value::Undefined(e.name);
    }
    case Expr::kAttr: {
      KRAKEN_ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0]));
      return Attribute(obj, e.name, e.line);
    }
    case Expr::kItem: {
      KRAKEN_ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0]));
      KRAKEN_ASSIGN_OR_RETURN(Value key, Eval(*e.args[1]));
      return Item(obj, key, e.line);
    }
    case Expr::kSlice:
      return Slice(e);
    case Expr::kCall:
      return Call(e);
    case Expr::kFilter:
      return Filter(e);
    case Expr::kTest:
      return Test(e);
    case Expr::kNeg: {
      KRAKEN_ASSIGN_OR_RETURN(Value v, Eval(*e.args[0]));
      if (!IsNumber(v.J())) return ErrorAt(e.line, StrCat("cannot negate a ", v.J().type_name()));
      if (!IsInt(v.J())) return Value::Of(-v.J().get<double>());
      int64_t r = 0;
      if (__builtin_sub_overflow(int64_t{0}, v.J().get<int64_t>(), &r)) return ErrorAt(e.line, "integer overflow in -");
      return Value::Of(r);
    }
    case Expr::kNot: {
      KRAKEN_ASSIGN_OR_RETURN(Value v, Eval(*e.args[0]));
      return Value::Of(!Truthy(v));
    }
    case Expr::kAnd:
    case Expr::kOr: {
      KRAKEN_ASSIGN_OR_RETURN(Value a, Eval(*e.args[0]));
      if (Truthy(a) == (e.kind == Expr::kOr)) return a;
      return Eval(*e.args[1]);
    }
    case Expr::kCond: {
      KRAKEN_ASSIGN_OR_RETURN(Value c, Eval(*e.args[0]));
      if (Truthy(c)) return Eval(*e.args[1]);
      if (e.args[2] == nullptr) return Value::Undefined("the else of a conditional expression");
      return Eval(*e.args[2]);
    }
    case Expr::kList: {
      json list = json::array();
      for (const ExprPtr& item : e.args) {
        KRAKEN_ASSIGN_OR_RETURN(Value v, Eval(*item));
        list.push_back(v.J());
      }
      return Value::Of(std::move(list));
    }
    case Expr::kDict: {
      json dict = json::object();
      for (size_t i = 0; i + 1 < e.args.size(); i += 2) {
        KRAKEN_ASSIGN_OR_RETURN(Value k, Eval(*e.args[i]));
        KRAKEN_ASSIGN_OR_RETURN(Value v, Eval(*e.args[i + 1]));
        dict[Text(k.J())] = v.J();
      }
      return Value::Of(std::move(dict));
    }
    case Expr::kBinary: {
      KRAKEN_ASSIGN_OR_RETURN(Value a, Eval(*e.args[0]));
      KRAKEN_ASSIGN_OR_RETURN(Value b, Eval(*e.args[1]));
      return Binary(e.name, a, b, e.line);
    }
  }
  return ErrorAt(e.line, "unknown expression");
}

StatusOr<Value> Renderer::Attribute(const Value& obj, const std::string& name, int line) {
  if (obj.undefined()) return ErrorAt(line, StrCat("'", obj.name, "' is undefined"));
  const json& v = obj.J();
  if (v.is_object()) {
    auto it = v.find(name);
    if (it != v.end()) return Value::Of(*it);
  }
  return Value::Undefined(
      StrCat(obj.kind == Value::kNamespace ? "namespace" : v.type_name(), " has no attribute '", name, "'"));
}

StatusOr<Value> Renderer::Item(const Value& obj, const Value& key, int line) {
  if (obj.undefined()) return ErrorAt(line, StrCat("'", obj.name, "' is undefined"));
  const json& v = obj.J();
  const json& k = key.J();
  if (v.is_object() && k.is_string()) return Attribute(obj, k.get<std::string>(), line);
  if ((v.is_array() || v.is_string()) && IsInt(k)) {
    std::vector<std::string> cps;
    if (v.is_string()) cps = CodePoints(v.get<std::string>());
    const int64_t len = v.is_array() ? static_cast<int64_t>(v.size()) : static_cast<int64_t>(cps.size());
    int64_t i = k.get<int64_t>();
    if (i < 0) i += len;
    if (i < 0 || i >= len) return Value::Undefined(StrCat("index ", k.get<int64_t>(), " is out of range"));
    return Value::Of(v.is_array() ? v[static_cast<size_t>(i)] : json(cps[static_cast<size_t>(i)]));
  }
  return Value::Undefined(StrCat(v.type_name(), " has no item ", PyRepr(k)));
}

StatusOr<Value> Renderer::Slice(const Expr& e) {
  KRAKEN_ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0]));
  std::optional<int64_t> bound[3];
  for (int k = 0; k < 3; ++k) {
    if (e.args[k + 1] == nullptr) continue;
    KRAKEN_ASSIGN_OR_RETURN(Value b, Eval(*e.args[k + 1]));
    if (b.J().is_null() || b.undefined()) continue;
    if (!IsInt(b.J())) return ErrorAt(e.line, "slice bounds must be integers");
    bound[k] = b.J().get<int64_t>();
  }
  const int64_t step = bound[2].value_or(1);
  if (step == 0) return ErrorAt(e.line, "a slice step cannot be zero");
  const json& v = obj.J();
  if (obj.undefined()) return ErrorAt(e.line, StrCat("'", obj.name, "' is undefined"));
  if (v.is_array()) {
    json out = json::array();
    for (int64_t i : SliceIndices(static_cast<int64_t>(v.size()), bound[0], bound[1], step))
      out.push_back(v[static_cast<size_t>(i)]);
    return Value::Of(std::move(out));
  }
  if (v.is_string()) {
    const std::vector<std::string> cps = CodePoints(v.get<std::string>());
    std::string out;
    for (int64_t i : SliceIndices(static_cast<int64_t>(cps.size()), bound[0], bound[1], step))
      out += cps[static_cast<size_t>(i)];
    return Value::Of(out);
  }
  return ErrorAt(e.line, StrCat("a ", v.type_name(), " cannot be sliced"));
}

StatusOr<std::vector<Value>> Renderer::Args(const Expr& e, size_t from) {
  std::vector<Value> out;
  for (size_t i = from; i < e.args.size(); ++i) {
    KRAKEN_ASSIGN_OR_RETURN(Value v, Eval(*e.args[i]));
    out.push_back(std::move(v));
  }
  return out;
}

StatusOr<Value> Renderer::Call(const Expr& e) {
  const Expr& callee = *e.args[0];
  KRAKEN_ASSIGN_OR_RETURN(std::vector<Value> args, Args(e, 1));
  if (callee.kind == Expr::kAttr) {
    KRAKEN_ASSIGN_OR_RETURN(Value obj, Eval(*callee.args[0]));
    return Method(obj, callee.name, args, e.line);
  }
  const std::string fn = callee.kind == Expr::kName ? callee.name : "";
  if (fn == "raise_exception") {
    return InvalidArgument(args.empty() ? std::string("the chat template raised an exception") : Text(args[0].J()));
  }
  if (fn == "namespace" || fn == "dict") {
    json attrs = !args.empty() && args[0].J().is_object() ? args[0].J() : json::object();
    for (const auto& [k, x] : e.kwargs) {
      KRAKEN_ASSIGN_OR_RETURN(Value v, Eval(*x));
      attrs[k] = v.J();
    }
    if (fn == "dict") return Value::Of(std::move(attrs));
    Value ns;
    ns.kind = Value::kNamespace;
    ns.ns = std::make_shared<json>(std::move(attrs));
    return ns;
  }
  if (fn == "range") {
    int64_t a = 0, b = 0, step = 1;
    for (const Value& v : args)
      if (!IsInt(v.J())) return ErrorAt(e.line, "range() takes integers");
    if (args.size() == 1) b = args[0].J().get<int64_t>();
    if (args.size() >= 2) a = args[0].J().get<int64_t>(), b = args[1].J().get<int64_t>();
    if (args.size() == 3) step = args[2].J().get<int64_t>();
    if (args.empty() || args.size() > 3 || step == 0)
      return ErrorAt(e.line, "range() takes 1 to 3 integers, step not 0");
    json out = json::array();
    for (int64_t i = a; step > 0 ? i < b : i > b; i += step) {
      KRAKEN_RETURN_IF_ERROR(Step(e.line));
      out.push_back(i);
    }
    return Value::Of(std::move(out));
  }
  if (fn == "strftime_now") {
    if (args.empty() || !args[0].J().is_string()) return ErrorAt(e.line, "strftime_now() takes a format string");
    const std::time_t now = std::time(nullptr);
    std::tm tm{};
    localtime_r(&now, &tm);
    char buf[256];
    const size_t n = std::strftime(buf, sizeof buf, args[0].J().get<std::string>().c_str(), &tm);
    return Value::Of(std::string(buf, n));
  }
  if (callee.kind == Expr::kName && Lookup(fn) == nullptr) return ErrorAt(e.line, StrCat("'", fn, "' is undefined"));
  return ErrorAt(e.line, StrCat("'", fn.empty() ? std::string("this value") : fn, "' is not callable here"));
}

// Python's str.split(sep): on runs of whitespace, dropping empty pieces, when `sep` is null.
json PySplit(const std::string& s, const std::string* sep) {
  json out = json::array();
  if (sep == nullptr) {
    size_t i = 0;
    while (i < s.size()) {
      while (i < s.size() && IsSpace(s[i])) ++i;
      size_t j = i;
      while (j < s.size() && !IsSpace(s[j])) ++j;
      if (j > i) out.push_back(s.substr(i, j - i));
      i = j;
    }
    return out;
  }
  size_t i = 0, j;
  while ((j = s.find(*sep, i)) != std::string::npos) {
    out.push_back(s.substr(i, j - i));
    i = j + sep->size();
  }
  out.push_back(s.substr(i));
  return out;
}

// The str methods templates call (Python's semantics); nullopt for another name.
std::optional<StatusOr<Value>> StringMethod(const std::string& s, const std::string& name,
                                            const std::vector<Value>& args, int line) {
  auto arg_string = [&](size_t i) -> const std::string* {
    return i < args.size() && args[i].J().is_string() ? &args[i].J().get_ref<const std::string&>() : nullptr;
  };
  if (name == "strip" || name == "lstrip" || name == "rstrip")
    return Value::Of(Strip(s, arg_string(0), name != "rstrip", name != "lstrip"));
  if (name == "upper" || name == "lower") {
    std::string out = s;
    for (char& c : out)
      c = static_cast<char>(name == "upper" ? std::toupper(static_cast<unsigned char>(c))
                                            : std::tolower(static_cast<unsigned char>(c)));
    return Value::Of(out);
  }
  if (name == "startswith" || name == "endswith") {
    json prefixes = args.empty() ? json::array() : args[0].J().is_array() ? args[0].J() : json::array({args[0].J()});
    for (const json& p : prefixes) {
      if (!p.is_string()) return ErrorAt(line, StrCat(name, "() takes strings"));
      const std::string& x = p.get_ref<const std::string&>();
      const bool hit =
          x.size() <= s.size() &&
          (name == "startswith" ? s.compare(0, x.size(), x) == 0 : s.compare(s.size() - x.size(), x.size(), x) == 0);
      if (hit) return Value::Of(true);
    }
    return Value::Of(false);
  }
  if (name == "split") {
    if (arg_string(0) != nullptr && arg_string(0)->empty()) return ErrorAt(line, "split() with an empty separator");
    return Value::Of(PySplit(s, arg_string(0)));
  }
  if (name == "replace") {
    const std::string *from = arg_string(0), *to = arg_string(1);
    if (from == nullptr || to == nullptr) return ErrorAt(line, "replace() takes two strings");
    if (from->empty()) return Value::Of(s);
    std::string out;
    size_t i = 0, j;
    while ((j = s.find(*from, i)) != std::string::npos) {
      out += s.substr(i, j - i) + *to;
      i = j + from->size();
    }
    return Value::Of(out + s.substr(i));
  }
  if (name == "title" || name == "capitalize") {
    std::string out = s;
    bool start = true;
    for (char& c : out) {
      const bool alpha = std::isalpha(static_cast<unsigned char>(c));
      c = static_cast<char>(start && alpha ? std::toupper(static_cast<unsigned char>(c))
                                           : std::tolower(static_cast<unsigned char>(c)));
      start = name == "title" ? !alpha : false;
    }
    return Value::Of(out);
  }
  if (name == "find") {
    const std::string* x = arg_string(0);
    if (x == nullptr) return ErrorAt(line, "find() takes a string");
    const size_t at = s.find(*x);
    return Value::Of(at == std::string::npos ? int64_t{-1} : static_cast<int64_t>(CodePoints(s.substr(0, at)).size()));
  }
  if (name == "join") {
    if (args.empty() || !args[0].J().is_array()) return ErrorAt(line, "join() takes a list");
    std::string out;
    for (size_t i = 0; i < args[0].J().size(); ++i) out += (i ? s : "") + Text(args[0].J()[i]);
    return Value::Of(out);
  }
  return std::nullopt;
}

StatusOr<Value> Renderer::Method(const Value& obj, const std::string& name, const std::vector<Value>& args, int line) {
  if (obj.undefined()) return ErrorAt(line, StrCat("'", obj.name, "' is undefined"));
  const json& v = obj.J();
  auto arg_string = [&](size_t i) -> const std::string* {
    return i < args.size() && args[i].J().is_string() ? &args[i].J().get_ref<const std::string&>() : nullptr;
  };
  if (v.is_string()) {
    if (std::optional<StatusOr<Value>> r = StringMethod(v.get_ref<const std::string&>(), name, args, line)) return *r;
  }
  if (v.is_object()) {
    if (name == "items" || name == "keys" || name == "values") {
      json out = json::array();
      for (const auto& [k, x] : v.items())
        out.push_back(name == "items" ? json::array({k, x}) : name == "keys" ? json(k) : x);
      return Value::Of(std::move(out));
    }
    if (name == "get") {
      const std::string* k = arg_string(0);
      if (k != nullptr && v.contains(*k)) return Value::Of(v[*k]);
      return args.size() > 1 ? args[1] : Value::Of(nullptr);
    }
  }
  return ErrorAt(line, StrCat("a ", obj.kind == Value::kNamespace ? "namespace" : v.type_name(), " has no method '",
                              name, "' here"));
}

// Jinja's tests (https://jinja.palletsprojects.com/templates/#list-of-builtin-tests).
StatusOr<bool> RunTest(const std::string& name, const Value& x, const std::vector<Value>& args, int line) {
  const json& v = x.J();
  auto arg = [&]() -> const json& {
    static const json null;
    return args.empty() ? null : args[0].J();
  };
  if (name == "defined") return !x.undefined();
  if (name == "undefined") return x.undefined();
  if (x.undefined() && name != "none") return false;
  if (name == "none") return !x.undefined() && v.is_null();
  if (name == "string") return v.is_string();
  if (name == "number") return IsNumber(v);
  if (name == "integer") return v.is_number_integer() || v.is_number_unsigned();
  if (name == "float") return v.is_number_float();
  if (name == "boolean") return v.is_boolean();
  if (name == "true") return v.is_boolean() && v.get<bool>();
  if (name == "false") return v.is_boolean() && !v.get<bool>();
  if (name == "mapping") return v.is_object() || x.kind == Value::kNamespace;
  if (name == "iterable") return v.is_array() || v.is_object() || v.is_string();
  if (name == "sequence") return v.is_array() || v.is_string() || v.is_object();
  if (name == "even" || name == "odd") return IsInt(v) && (v.get<int64_t>() % 2 == 0) == (name == "even");
  if (name == "divisibleby") {
    if (!IsInt(v) || !IsInt(arg()) || arg().get<int64_t>() == 0) return false;
    return arg().get<int64_t>() == -1 || v.get<int64_t>() % arg().get<int64_t>() == 0;
  }
  if (name == "equalto" || name == "eq" || name == "==" || name == "sameas") return v == arg();
  if (name == "ne" || name == "!=") return v != arg();
  if (name == "in")
    return arg().is_array() ? std::find(arg().begin(), arg().end(), v) != arg().end()
                            : arg().is_object() && v.is_string() && arg().contains(v.get<std::string>());
  if (IsNumber(v) && IsNumber(arg())) {
    const double a = v.get<double>(), b = arg().get<double>();
    if (name == "lt" || name == "lessthan") return a < b;
    if (name == "gt" || name == "greaterthan") return a > b;
    if (name == "le") return a <= b;
    if (name == "ge") return a >= b;
  }
  return ErrorAt(line, StrCat("the test '", name, "' is not supported here"));
}

StatusOr<Value> Renderer::Test(const Expr& e) {
  KRAKEN_ASSIGN_OR_RETURN(Value x, Eval(*e.args[0]));
  KRAKEN_ASSIGN_OR_RETURN(std::vector<Value> args, Args(e, 1));
  KRAKEN_ASSIGN_OR_RETURN(bool r, RunTest(e.name, x, args, e.line));
  return Value::Of(r != e.negated);
}

// The filters over a sequence: list, items, reverse, selectattr, rejectattr, map(attribute=).
StatusOr<Value> Renderer::SequenceFilter(const Expr& e, const Value& x, const std::vector<Value>& args) {
  const std::string& f = e.name;
  const json& v = x.J();
  auto kwarg = [&](const char* key, size_t pos) { return Kwarg(e, args, key, pos); };
  if (f == "list" || f == "items" || f == "reverse") {
    json out = json::array();
    if (v.is_array())
      out = v;
    else if (v.is_object())
      for (const auto& [k, y] : v.items()) out.push_back(f == "items" ? json::array({k, y}) : json(k));
    else if (v.is_string())
      for (const std::string& c : CodePoints(v.get<std::string>())) out.push_back(c);
    else
      return ErrorAt(e.line, StrCat("a ", v.type_name(), " is not iterable"));
    if (f == "reverse") {
      if (v.is_string()) {
        std::string r;
        for (auto it = out.rbegin(); it != out.rend(); ++it) r += it->get<std::string>();
        return Value::Of(r);
      }
      std::reverse(out.begin(), out.end());
    }
    return Value::Of(std::move(out));
  }
  if ((f == "selectattr" || f == "rejectattr" || f == "map") && v.is_array()) {
    json out = json::array();
    KRAKEN_ASSIGN_OR_RETURN(std::optional<Value> attribute, kwarg("attribute", f == "map" ? 99 : 0));
    if (!attribute || !attribute->J().is_string()) return ErrorAt(e.line, StrCat(f, "() needs an attribute name"));
    const std::string attr = attribute->J().get<std::string>();
    for (const json& item : v) {
      KRAKEN_RETURN_IF_ERROR(Step(e.line));  // a filter's work counts, so a filter in a loop stays bounded
      KRAKEN_ASSIGN_OR_RETURN(Value a, Attribute(Value::Of(item), attr, e.line));
      if (f == "map") {  // a missing attribute maps to jinja2's Undefined, which prints as ""
        out.push_back(a.undefined() ? json("") : a.J());
        continue;
      }
      bool keep = Truthy(a);
      if (args.size() > 1) {
        std::vector<Value> rest(args.begin() + 2, args.end());
        KRAKEN_ASSIGN_OR_RETURN(keep, RunTest(Text(args[1].J()), a, rest, e.line));
      }
      if (keep == (f == "selectattr")) out.push_back(item);
    }
    return Value::Of(std::move(out));
  }
  return ErrorAt(e.line, StrCat("the filter '", f, "' is not supported here (on a ", v.type_name(), ")"));
}

StatusOr<std::optional<Value>> Renderer::Kwarg(const Expr& e, const std::vector<Value>& args, const char* key,
                                               size_t pos) {
  for (const auto& [k, v] : e.kwargs)
    if (k == key) {
      KRAKEN_ASSIGN_OR_RETURN(Value got, Eval(*v));
      return std::optional<Value>(got);
    }
  if (pos < args.size()) return std::optional<Value>(args[pos]);
  return std::optional<Value>();
}

StatusOr<Value> Renderer::Filter(const Expr& e) {
  KRAKEN_ASSIGN_OR_RETURN(Value x, Eval(*e.args[0]));
  KRAKEN_ASSIGN_OR_RETURN(std::vector<Value> args, Args(e, 1));
  auto kwarg = [&](const char* key, size_t pos) { return Kwarg(e, args, key, pos); };
  const std::string& f = e.name;
  if (f == "default" || f == "d") {
    KRAKEN_ASSIGN_OR_RETURN(std::optional<Value> dflt, kwarg("default_value", 0));
    KRAKEN_ASSIGN_OR_RETURN(std::optional<Value> boolean, kwarg("boolean", 1));
    const bool use = x.undefined() || (boolean && Truthy(*boolean) && !Truthy(x));
    return use ? dflt.value_or(Value::Of("")) : x;
  }
  if (x.undefined() && f != "string" && f != "length" && f != "count")
    return ErrorAt(e.line, StrCat("'", x.name, "' is undefined"));
  const json& v = x.J();
  if (f == "trim" || f == "upper" || f == "lower" || f == "capitalize" || f == "title" || f == "replace") {
    if (!v.is_string()) return ErrorAt(e.line, StrCat("the filter '", f, "' takes a string, got a ", v.type_name()));
    return Method(x, f == "trim" ? "strip" : f, args, e.line);
  }
  if (f == "length" || f == "count") {
    if (x.undefined()) return Value::Of(0);
    if (v.is_string()) return Value::Of(static_cast<int64_t>(CodePoints(v.get<std::string>()).size()));
    if (v.is_array() || v.is_object()) return Value::Of(static_cast<int64_t>(v.size()));
    return ErrorAt(e.line, StrCat("a ", v.type_name(), " has no length"));
  }
  if (f == "string") return Value::Of(x.undefined() ? std::string() : Text(v));
  if (f == "safe") return x;
  if (f == "tojson") {
    KRAKEN_ASSIGN_OR_RETURN(std::optional<Value> indent, kwarg("indent", 0));
    std::string out;
    JsonDump(v, indent && IsInt(indent->J()) ? static_cast<int>(indent->J().get<int64_t>()) : -1, 0, &out);
    return Value::Of(out);
  }
  if (f == "first" || f == "last") {
    if (v.is_array())
      return v.empty() ? Value::Undefined("an empty list's item") : Value::Of(f == "first" ? v.front() : v.back());
    if (v.is_string()) {
      const std::vector<std::string> cps = CodePoints(v.get<std::string>());
      return cps.empty() ? Value::Undefined("an empty string's character")
                         : Value::Of(f == "first" ? cps.front() : cps.back());
    }
  }
  if (f == "join" && v.is_array()) {
    KRAKEN_ASSIGN_OR_RETURN(std::optional<Value> sep, kwarg("d", 0));
    std::string out;
    for (size_t i = 0; i < v.size(); ++i) out += (i && sep ? Text(sep->J()) : "") + Text(v[i]);
    return Value::Of(out);
  }
  if (f == "int" || f == "float") {
    if (f == "int" && IsInt(v)) return x;
    double d = 0;
    if (IsNumber(v))
      d = v.get<double>();
    else if (v.is_string())
      d = std::strtod(v.get<std::string>().c_str(), nullptr);
    if (f == "float") return Value::Of(d);
    if (!(std::fabs(d) < 9.2e18)) return ErrorAt(e.line, StrCat("the filter 'int' cannot hold ", FloatText(d)));
    return Value::Of(static_cast<int64_t>(d));
  }
  if (f == "abs" && IsNumber(v)) {
    if (!IsInt(v)) return Value::Of(std::fabs(v.get<double>()));
    if (v.get<int64_t>() == std::numeric_limits<int64_t>::min()) return ErrorAt(e.line, "integer overflow in abs");
    return Value::Of(std::llabs(v.get<int64_t>()));
  }
  if (f == "list" || f == "items" || f == "reverse" || f == "selectattr" || f == "rejectattr" || f == "map")
    return SequenceFilter(e, x, args);
  return ErrorAt(e.line, StrCat("the filter '", f, "' is not supported here (on a ", v.type_name(), ")"));
}

// Python's integer arithmetic on two int64s, overflow refused; nullopt for "/" and the others it
// leaves to floats.
std::optional<StatusOr<Value>> IntegerOp(const std::string& op, int64_t p, int64_t q, int line) {
  int64_t r = 0;
  const Status overflow = ErrorAt(line, StrCat("integer overflow in ", p, " ", op, " ", q));
  if (op == "+") return __builtin_add_overflow(p, q, &r) ? StatusOr<Value>(overflow) : Value::Of(r);
  if (op == "-") return __builtin_sub_overflow(p, q, &r) ? StatusOr<Value>(overflow) : Value::Of(r);
  if (op == "*") return __builtin_mul_overflow(p, q, &r) ? StatusOr<Value>(overflow) : Value::Of(r);
  if ((op == "//" || op == "%") && q == 0) return ErrorAt(line, "division by zero");
  if ((op == "//" || op == "%") && q == -1) {  // p / -1 overflows for the smallest p
    if (op == "%") return Value::Of(int64_t{0});
    return __builtin_sub_overflow(int64_t{0}, p, &r) ? StatusOr<Value>(overflow) : Value::Of(r);
  }
  const int64_t fl = p / q - ((p % q != 0) && ((p < 0) != (q < 0)) ? 1 : 0);  // Python's floor division
  if (op == "//") return Value::Of(fl);
  if (op == "%") return Value::Of(p - fl * q);
  if (op == "**" && q >= 0) {
    r = 1;
    for (int64_t i = 0; i < q; ++i) {  // at most 63 rounds for |p| >= 2 before it overflows
      if (p == -1) {
        r = q % 2 == 0 ? 1 : -1;
        break;
      }
      if (__builtin_mul_overflow(r, p, &r)) return overflow;
      if (p == 0 || p == 1) break;
    }
    return Value::Of(r);
  }
  return std::nullopt;
}

StatusOr<Value> Renderer::Binary(const std::string& op, const Value& a, const Value& b, int line) {
  const json &x = a.J(), &y = b.J();
  if (op == "~") return Value::Of((a.undefined() ? "" : Text(x)) + (b.undefined() ? "" : Text(y)));
  if (op == "==" || op == "!=") {
    const bool eq = a.undefined() || b.undefined() ? a.undefined() && b.undefined() : x == y;
    return Value::Of(eq == (op == "=="));
  }
  if (op == "in" || op == "not in") {
    bool found = false;
    if (y.is_string() && x.is_string())
      found = y.get<std::string>().find(x.get<std::string>()) != std::string::npos;
    else if (y.is_array())
      found = std::find(y.begin(), y.end(), x) != y.end();
    else if (y.is_object())
      found = x.is_string() && y.contains(x.get<std::string>());
    else if (!b.undefined())  // nothing is in an undefined value, as jinja2 tests it
      return ErrorAt(line, StrCat("'in' needs a string, list or dict on its right, got a ", y.type_name()));
    return Value::Of(found == (op == "in"));
  }
  if (a.undefined()) return ErrorAt(line, StrCat("'", a.name, "' is undefined"));
  if (b.undefined()) return ErrorAt(line, StrCat("'", b.name, "' is undefined"));
  if (op == "<" || op == ">" || op == "<=" || op == ">=") {
    int cmp = 0;
    if (IsNumber(x) && IsNumber(y))
      cmp = x.get<double>() < y.get<double>() ? -1 : x.get<double>() > y.get<double>();
    else if (x.is_string() && y.is_string())
      cmp = x.get<std::string>().compare(y.get<std::string>());
    else
      return ErrorAt(line, StrCat("cannot compare a ", x.type_name(), " with a ", y.type_name()));
    return Value::Of(op == "<" ? cmp < 0 : op == ">" ? cmp > 0 : op == "<=" ? cmp <= 0 : cmp >= 0);
  }
  if (op == "+" && x.is_string() && y.is_string()) return Value::Of(x.get<std::string>() + y.get<std::string>());
  if (op == "+" && x.is_array() && y.is_array()) {
    json out = x;
    for (const json& item : y) out.push_back(item);
    return Value::Of(std::move(out));
  }
  if (op == "*" && x.is_string() && IsInt(y)) {
    std::string out;
    for (int64_t i = 0; i < y.get<int64_t>() && out.size() <= ChatTemplate::kMaxRenderBytes; ++i)
      out += x.get<std::string>();
    return Value::Of(out);
  }
  if (!IsNumber(x) || !IsNumber(y))
    return ErrorAt(line, StrCat("'", op, "' between a ", x.type_name(), " and a ", y.type_name(), " is not defined"));
  if (op == "/") {
    if (y.get<double>() == 0) return ErrorAt(line, "division by zero");
    return Value::Of(x.get<double>() / y.get<double>());
  }
  if (IsInt(x) && IsInt(y)) {
    if (std::optional<StatusOr<Value>> r = IntegerOp(op, x.get<int64_t>(), y.get<int64_t>(), line)) return *r;
  }
  const double p = x.get<double>(), q = y.get<double>();
  if (op == "+") return Value::Of(p + q);
  if (op == "-") return Value::Of(p - q);
  if (op == "*") return Value::Of(p * q);
  if (op == "**") return Value::Of(std::pow(p, q));
  if (q == 0) return ErrorAt(line, "division by zero");
  if (op == "//") return Value::Of(std::floor(p / q));
  if (op == "%") return Value::Of(p - std::floor(p / q) * q);
  return ErrorAt(line, StrCat("unknown operator '", op, "'"));
}

}  // namespace

StatusOr<std::string> ChatTemplate::Render(const json& context) const {
  if (!context.is_object())
    return InvalidArgument("a chat template renders an object of names, got a ", context.type_name());
  Renderer r(context);
  return r.Run(*root_);
}

namespace {

StatusOr<std::optional<std::string>> ReadIfPresent(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::optional<std::string>();
  return std::optional<std::string>(
      std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>()));
}

// A special token as tokenizer_config.json spells it: a string, or an object with "content".
std::optional<std::string> TokenText(const nlohmann::json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  return std::nullopt;
}

}  // namespace

StatusOr<std::optional<ModelChatTemplate>> LoadChatTemplate(const std::string& dir, const std::string& override_path) {
  ModelChatTemplate m;
  std::optional<std::string> source;
  KRAKEN_ASSIGN_OR_RETURN(std::optional<std::string> config_text, ReadIfPresent(dir + "/tokenizer_config.json"));
  nlohmann::json config = nlohmann::json::object();
  if (config_text) {
    KRAKEN_ASSIGN_OR_RETURN(config, ParseJsonStrict(*config_text, dir + "/tokenizer_config.json", 32));
    for (const char* name :
         {"bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"}) {
      if (!config.is_object() || !config.contains(name)) continue;
      if (std::optional<std::string> t = TokenText(config[name])) m.special_tokens[name] = *t;
    }
    if (config.is_object() && config.contains("additional_special_tokens") &&
        config["additional_special_tokens"].is_array()) {
      nlohmann::ordered_json extra = nlohmann::ordered_json::array();
      for (const nlohmann::json& t : config["additional_special_tokens"])
        if (std::optional<std::string> text = TokenText(t)) extra.push_back(*text);
      m.special_tokens["additional_special_tokens"] = std::move(extra);
    }
  }
  KRAKEN_ASSIGN_OR_RETURN(std::optional<std::string> file, ReadIfPresent(dir + "/chat_template.jinja"));
  if (!override_path.empty()) {
    KRAKEN_ASSIGN_OR_RETURN(source, ReadIfPresent(override_path));
    if (!source) return NotFound("cannot read the chat template '", override_path, "' (--chat-template)");
    m.origin = override_path;
  } else if (file) {
    source = std::move(file);
    m.origin = dir + "/chat_template.jinja";
  } else if (config.is_object() && config.contains("chat_template")) {
    const nlohmann::json& t = config["chat_template"];
    if (t.is_string()) source = t.get<std::string>();
    if (t.is_array())
      for (const nlohmann::json& named : t)
        if (named.is_object() && named.value("name", "") == "default" && named.contains("template") &&
            named["template"].is_string())
          source = named["template"].get<std::string>();
    m.origin = dir + "/tokenizer_config.json";
  }
  if (!source) return std::optional<ModelChatTemplate>();
  StatusOr<ChatTemplate> parsed = ChatTemplate::Parse(*source);
  if (!parsed.ok()) return InvalidArgument(m.origin, ": ", std::string(parsed.status().message()));
  m.chat_template = std::move(*parsed);
  return std::optional<ModelChatTemplate>(std::move(m));
}

}  // namespace kraken::tokenizer
